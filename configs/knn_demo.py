"""kNN accuracy (DINO protocol) of the demo student on Fashion-MNIST; `make demo` ends with the same kNN inside
configs/compare_demo.py (beside the untrained student and raw pixels, and a linear probe).

Command (after `make demo`, which pretrains into workdirs/demo):
  python main.py --mode=knn --config=configs/knn_demo.py --workdir=workdirs/demo/knn \
      --config.pretrained.workdir=workdirs/demo
Expected result (2026-12-07, Python 3.11.7, jax/jaxlib 0.10.2, flax 0.12.8, numpy 2.4.6, 2 cores of an AMD
EPYC VM; code with the exact evaluation crop): top-1 58.9%, top-5 94.7% on the 10,000 test images for the step-500
checkpoint of `make demo` (the student at initialisation gives 54.0%, raw pixels 82.0% with this bank:
configs/compare_demo.py). Earlier measurements: docs/RESULTS.md ("The demo's figures over time").
"""
import ml_collections
from ml_collections import config_dict

from configs import demo


def get_config(arg: str = ""):
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "knn"  # what main.py runs (dtm_jax/registry.py)
  c.pretrained = dict(workdir="workdirs/demo", step=config_dict.placeholder(int))  # step: None = latest.
  # The student --mode=compile assumes (it reads no checkpoint; runs take the architecture from the checkpoint).
  c.pretrained.architecture = demo.get_config().model.to_dict()
  c.model = {}  # Overrides of the pretrained student's ViTConfig.
  c.input = demo.get_config().input  # Bank from input.train_split, queries from input.eval_split.
  c.input.eval_split = "test"
  # The train split's size (the bank when knn.num_train_examples = 0) and its classes: --mode=compile sizes the
  # bank from them (runs count the data).
  c.num_train_examples = 60_000
  c.num_classes = 10
  c.features = dict(pooling="mean", num_blocks=1)
  # k neighbours, temperature T of the exp(similarity / T) votes, and the slices (0 = the whole split): a bank of
  # 20k training images keeps the run that `make demo` ends with under a minute.
  c.knn = dict(k=20, temperature=0.07, batch_size=1000, num_train_examples=20_000, num_eval_examples=0)
  c.mesh = dict(data=-1, fsdp=1, min_fsdp_size=2 ** 18)
  return c
