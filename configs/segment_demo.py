"""Semantic segmentation of Fashion-MNIST canvases with the demo student on the CPU (offline; issue #19's demo).

The task (input_pipeline/segment_sources.py): 56×56 canvases of 2×2 garments, 11 classes (0 = background, 1 + the
garment class on its bright pixels); 15,000 training and 2,500 test canvases from Debian's IDX files, no downloads.
Command (after `make demo`, which pretrains into workdirs/demo):
  python main.py --mode=segment --config=configs/segment_demo.py --workdir=workdirs/demo/segment \
      --config.pretrained.workdir=workdirs/demo
From-scratch baseline (the same model and recipe from a random initialisation):
  python main.py --mode=segment --config=configs/segment_demo.py --workdir=workdirs/demo/segment_scratch \
      --config.pretrained.workdir=
Rerunning the same command resumes (or, once finished, just reports). UperNet (32 channels) on the 4 blocks of the
demo student at 32×32 crops (its 7×7 relative-position tables resized to the 8×8 grid; 4-pixel patches put the
pyramid at 1/1 … 1/8), AdamW with layer decay 0.9, poly schedule with warm-up, 300 steps of 32 crops; evaluation by
32×32 windows with stride 24 over all 2,500 56×56 test canvases at the end.
Expected result (2026-12-03, the step-500 checkpoint of `make demo`, 2 shared cores of an AMD EPYC VM, 4.5–7 min per
run while other jobs ran; --config.seed=0, 1, 2): pretrained mIoU 20.02 / 18.17 / 16.60% (aAcc 65.8 / 64.3 /
64.2%), from scratch 15.99 / 16.70 / 15.23% (aAcc 63.1 / 63.8 / 62.8%): 18.3 ± 1.7 vs 16.0 ± 0.7 mIoU, the pretrained
student ahead on every seed by +2.3 ± 1.5 (paired). A UperNet of 64 channels reached 24.9% pretrained (seed 0, 8 min).
"""
import ml_collections
from ml_collections import config_dict

from configs import demo
from input_pipeline import config as input_config


def get_config(arg: str = ""):
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "segment"  # what main.py runs (dtm_jax/registry.py)
  c.allow_config_change = False  # resume a workdir whose checkpoint has another config (dtm_jax/runner/resume.py)
  c.seed = 0
  c.pretrained = dict(workdir="workdirs/demo", step=config_dict.placeholder(int))  # "": random initialisation
  # The student --mode=compile and the from-scratch baseline assume (runs take the architecture from the checkpoint).
  c.pretrained.architecture = demo.get_config().model.to_dict()
  c.model = dict(drop_path_rate=0.1, remat="none")
  c.segmenter = dict(num_classes=11, out_indices=(0, 1, 2, 3), channels=32, pool_scales=(1, 2, 3, 6),
                     aux_channels=16, aux_in_index=2, aux_weight=0.4, dropout=0.1, ignore_index=255)
  c.input = input_config.segment_config()
  c.input.update(source="fashion_mnist_segmentation", data_dir="/usr/share/datasets/fashion-mnist",
                 train_split="train", eval_split="test", reduce_zero_label=False, scale=(56, 56),
                 mean=(0.286,) * 3, std=(0.353,) * 3)  # the demo's normalisation (configs/demo.py)
  c.crop_size = 32
  c.batch_size = 32
  c.eval_batch_size = 100
  c.total_steps = 300
  c.warmup_steps = 30
  c.optim = dict(base_lr=2e-3, lr_scaling="none", lr_reference_batch=32, min_lr=0.0, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.05, no_decay_names=(), grad_clip=0.0, layer_decay=0.9, schedule="poly",
                 poly_power=1.0)
  c.eval = dict(window=32, stride=24, canvas_size=56, scales=(1.0,), flip=False, num_images=0)
  c.eval_every_steps = 300
  c.keep_checkpoints = 2
  c.log_every = 50
  c.progress_every_secs = 20.0
  c.stop_after_step = config_dict.placeholder(int)
  c.mesh = dict(data=-1, fsdp=1, min_fsdp_size=2 ** 18)
  return c
