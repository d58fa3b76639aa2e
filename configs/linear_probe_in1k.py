"""Linear probe of a ViT-B/16 student on ImageNet-1K (MAE's protocol).

Command:
  python main.py --mode=linear_probe --config=configs/linear_probe_in1k.py --workdir=$WORKDIR/linear_probe \
      --config.pretrained.workdir=$WORKDIR --config.input.data_dir=$TFDS_DATA_DIR
Frozen student, mean-pooled final patch tokens, BatchNorm without affine + linear head, LARS, lr 0.1 × 16384 / 256,
90 epochs (10 warm-up), RandomResizedCrop + flip on the training images (features recomputed every step).
Expected result (paper): none to compare with; docs/METHOD.md §7 lists no ImageNet linear probe of the DTM ViT-B/16
(only the pilot study's probe of CLIP tokens, 44.2 → 46.3). We have not run it (no ImageNet here); report your number in
docs/RESULTS.md.
"""
import ml_collections
from ml_collections import config_dict

from configs import common


def get_config(arg: str = ""):
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "linear_probe"  # what main.py runs (dtm_jax/registry.py)
  c.allow_config_change = False  # resume a workdir whose checkpoint has another config (dtm_jax/runner/resume.py)
  c.seed = 0
  c.pretrained = dict(workdir="", step=config_dict.placeholder(int))  # step: None = latest.
  # The student --mode=compile assumes (it reads no checkpoint; runs take the architecture from the checkpoint).
  c.pretrained.architecture = common.pretrain_config().model.to_dict()
  c.model = dict(dtype="bfloat16")  # Overrides of the pretrained student's ViTConfig.
  c.input = common.input_config(randaug_num_layers=0, random_erase_prob=0.0)  # MAE: RandomResizedCrop + flip only.
  c.num_classes = 1000
  c.features = dict(pooling="mean", num_blocks=1)
  c.precompute_features = False  # Encode every augmented training batch (True: fixed features of the eval crop).
  c.augment = True
  c.num_train_examples = 1_281_167  # Turns epochs into steps.
  c.batch_size = 16384
  c.eval_batch_size = 1024
  c.epochs = 90
  c.warmup_epochs = 10
  c.optimizer = dict(name="lars", base_lr=0.1, lr_reference_batch=256, momentum=0.9, weight_decay=0.0, min_lr=0.0)
  c.bn_momentum = 0.9
  c.eval_every_epochs = 1
  c.mesh = dict(data=-1, fsdp=1, min_fsdp_size=2 ** 18)
  return c
