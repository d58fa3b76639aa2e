"""kNN accuracy (DINO protocol: k=20, T=0.07, cosine) of a student on ImageNet-1K.

Command:
  python main.py --mode=knn --config=configs/knn_in1k.py --workdir=$WORKDIR/knn \
      --config.pretrained.workdir=$WORKDIR --config.input.data_dir=$TFDS_DATA_DIR
The whole training set is the bank (1.28M features split over the devices); set --config.knn.num_train_examples for
a cheaper slice. Expected result: not reported by the paper; we have not run it (no ImageNet here).
"""
import ml_collections
from ml_collections import config_dict

from configs import common


def get_config(arg: str = ""):
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "knn"  # what main.py runs (dtm_jax/registry.py)
  c.pretrained = dict(workdir="", step=config_dict.placeholder(int))
  # The student --mode=compile assumes (it reads no checkpoint; runs take the architecture from the checkpoint).
  c.pretrained.architecture = common.pretrain_config().model.to_dict()
  c.model = dict(dtype="bfloat16")
  c.input = common.input_config()
  # The train split's size (the bank when knn.num_train_examples = 0) and its classes: --mode=compile sizes the
  # bank from them (runs count the data).
  c.num_train_examples = 1_281_167
  c.num_classes = 1000
  c.features = dict(pooling="mean", num_blocks=1)
  c.knn = dict(k=20, temperature=0.07, batch_size=1024, num_train_examples=0, num_eval_examples=0)
  c.mesh = dict(data=-1, fsdp=1, min_fsdp_size=2 ** 18)
  return c
