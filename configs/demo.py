"""The embedded default: DTM pretraining of a small student on Fashion-MNIST on the CPU, then what it bought.

Command (what `make demo` runs):
  python main.py --config=configs/demo.py --workdir=workdirs/demo
Needs only Debian's dataset-fashion-mnist IDX files (no downloads). 28×28 images, patch 4 → 49 tokens, a 4-block
student of width 96, DTM with the schedule ranges scaled to 49 tokens.
Target: normalised patch pixels (MAE-style, 48 values per patch). No teacher to download, and the best
no-download target of the study in docs/RESULTS.md (linear probe 68.7% vs 56.6% EMA teacher, 54.7% random CLIP tower).
The semantic teacher of tools/train_teacher.py makes better students with this same recipe (kNN 71.7%, probe 74.1%
over 3 seeds, docs/RESULTS.md) but must be trained first (15 min on 2 cores), which a 5-minute first command cannot
afford.
Expected result (2026-12-07, code with the exact evaluation crop, Python 3.11.7, jax/jaxlib 0.10.2, flax 0.12.8,
numpy 2.4.6, 2 cores of an AMD EPYC VM): 500 steps, then `--mode=compare` (configs/compare_demo.py)
prints what pretraining bought on the 10,000 test images (kNN bank and probe training set: 20,000 train images;
the untrained student is computed on each run):
  features                 kNN top-1   linear probe top-1
  pretrained student           58.9%                71.5%
  untrained student            54.0%                50.0%
  raw pixels                   82.0%                79.3%
i.e. +21 points of probe accuracy (+5 kNN) over the same student untrained; raw pixels remain ahead of this short
run. `make demo` took 3m18s with an existing .venv (code of 2026-12-07 with the exact evaluation
crop). The figures depend on the jax/XLA build (float summation
orders): earlier measurements are listed in docs/RESULTS.md ("The demo's figures over time").
Evaluate further: `python main.py --mode=linear_probe --config=configs/linear_probe_demo.py
--workdir=workdirs/demo/probe --config.pretrained.workdir=workdirs/demo` (and configs/finetune_demo.py with
--mode=finetune).
"""
import ml_collections

from configs import common


def get_config(arg: str = ""):
  del arg
  c = common.pretrain_config()
  c.model.update(variant="tiny", image_size=28, patch_size=4, drop_path_rate=0.0, dtype="float32")
  c.model.update(width=96, depth=4, num_heads=3, out_dim=48)  # out_dim: the 4·4·3 pixels of a patch
  c.target.update(kind="pixels", normalize_patches=True)  # the best no-download target in docs/RESULTS.md
  c.input = common.input_config(source="fashion_mnist", data_dir="/usr/share/datasets/fashion-mnist",
                                num_masking_patches=19, min_num_patches=4, crop_scale_min=0.35,
                                mean=(0.286,) * 3, std=(0.353,) * 3)
  c.batch_size = 128
  c.num_train_examples = 60_000
  c.total_steps = 500
  c.warmup_steps = 100
  c.optim.base_lr = 1.5e-3
  c.optim.lr_scaling = "none"
  c.dtm.max_iters = 7
  c.dtm.schedule_group_size = -1  # one draw per step, as the released code on one GPU
  c.log_every = 100
  c.progress_every_secs = 20.0
  c.checkpoint_every = 500
  c.then_evaluate = ml_collections.ConfigDict(dict(config_module="configs.compare_demo"))
  return c
