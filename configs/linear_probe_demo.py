"""Linear probe of the demo student on Fashion-MNIST: frozen features computed once, probe trained on the CPU.

Command (after `make demo`, which pretrains into workdirs/demo):
  python main.py --mode=linear_probe --config=configs/linear_probe_demo.py --workdir=workdirs/demo/linear_probe \
      --config.pretrained.workdir=workdirs/demo
Expected result (2026-12-07, Python 3.11.7, jax/jaxlib 0.10.2, flax 0.12.8, numpy 2.4.6, 2 cores of an AMD
EPYC VM; code with the exact evaluation crop): top-1 73.7%, top-5 98.8% on the 10,000 test images for the step-500
checkpoint of `make demo`. Earlier measurements: docs/RESULTS.md ("The demo's figures over time").
"""
import ml_collections
from ml_collections import config_dict

from configs import demo


def get_config(arg: str = ""):
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "linear_probe"  # what main.py runs (dtm_jax/registry.py)
  c.allow_config_change = False  # resume a workdir whose checkpoint has another config (dtm_jax/runner/resume.py)
  c.seed = 0
  c.pretrained = dict(workdir="workdirs/demo", step=config_dict.placeholder(int))  # step: None = latest.
  # The student --mode=compile assumes (it reads no checkpoint; runs take the architecture from the checkpoint).
  c.pretrained.architecture = demo.get_config().model.to_dict()
  c.model = {}  # Overrides of the pretrained student's ViTConfig (e.g. dtype="bfloat16").
  c.input = demo.get_config().input  # The pretraining source and normalisation, evaluated without augmentation.
  c.input.eval_split = "test"
  c.num_classes = 10
  c.features = dict(pooling="mean", num_blocks=1)  # "mean" of the patch tokens or "cls"; average the last k blocks.
  c.precompute_features = True  # Encode train and test once; the probe then trains on fixed features.
  c.augment = True  # Without precomputed features: random crop + flip (+ the input block's RandAugment/erasing).
  c.num_train_examples = 60_000  # Without precomputed features: turns epochs into steps.
  c.batch_size = 1024
  c.eval_batch_size = 1000
  c.epochs = 90
  c.warmup_epochs = 10
  # lr = base_lr × batch / lr_reference_batch. SGD with momentum: LARS (MAE, configs/linear_probe_in1k.py) scales
  # each step by 0.001·|w|/|g| and needs MAE's batch of 16384 to move (at this batch it gives 64.5% here, not 73%).
  c.optimizer = dict(name="sgd", base_lr=0.5, lr_reference_batch=256, momentum=0.9, weight_decay=0.0, min_lr=0.0)
  c.bn_momentum = 0.9  # Running statistics of the probe's BatchNorm (PyTorch momentum 0.1).
  c.eval_every_epochs = 10
  c.mesh = dict(data=-1, fsdp=1, min_fsdp_size=2 ** 18)
  return c
