"""Semantic segmentation of ADE20K with a DTM ViT-B/16 student: UperNet, BEiT v2's recipe (issue #19).

Command (data_dir holds ADEChallengeData2016/, see README "ADE20K"):
  python main.py --mode=segment --config=configs/segment_ade20k_vit_b16.py --workdir=$WORKDIR/ade20k \
      --config.pretrained.workdir=$WORKDIR --config.input.data_dir=$ADE20K_DIR
Rerunning the same command resumes. From-scratch baseline: --config.pretrained.workdir= (random initialisation).
Recipe: microsoft/unilm, beit2/semantic_segmentation/configs/beit/upernet/
upernet_beit_base_12_512_slide_160k_ade20k.py (mmseg 0.11): UperNet (channels 768, pool scales 1, 2, 3, 6) on blocks
3, 5, 7, 11 with BEiT's ×4/×2/×1/×½ adapters, auxiliary FCN head (256 channels, weight 0.4) on the third level,
SyncBN; AdamW lr 5e-5, β (0.9, 0.999), weight decay 0.05, layer-wise lr decay 0.75, no gradient clipping; poly
schedule (power 1, min lr 0) over 160k iterations with a 1500-iteration linear warm-up from 1e-6 × lr; batch 16
(8 GPUs × 2); drop path 0.15 (that file's value); crops of 512 from mmseg's ADE20K pipeline (keep-ratio resize into
2048×512 × 0.5–2.0, cat_max_ratio 0.75, flip, photometric distortion, reduce_zero_label); evaluation by 512 windows
with stride 341 (single scale, no flip; `eval.scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75)` and `eval.flip=True` give
mmseg's multi-scale + flip test). The released code decays every ≥2-D parameter, cls_token and relative-position
tables too (its no-decay name check never matches the "backbone."-prefixed names), so `no_decay_names` is empty.
Deviation: evaluation images are resized keep-ratio into 2048×512 and padded onto a 1024² canvas (images whose long
side still exceeds it are shrunk to fit; the pipeline logs how many), and scored at that size, not at the original
annotation size as mmseg does.
Expected result: 52.7 mIoU for BEiT v2's ViT-B/16 after 300 pretraining epochs (53.1 after 1600; Peng et al. 2022,
"BEiT v2", Table 1, single scale). DTM reports +0.3 mIoU over prior methods at the same budget (docs/METHOD.md §7; the
paper's exact ADE20K figure is to be checked), i.e. ≈ 53.0.
Slices (--mode=compile, 2026-12-03, jax 0.10.2 / libtpu 0.0.42.1): on v5p-16 (8 chips, 2 crops each) the train step
takes 7.22 GiB of 95 per chip (no remat, no FSDP), compiler FLOPs 1.01× the analytic count, roofline ≥ 37 ms
(HBM-bound); the eval step (then with eval_batch_size=8: one 1024² canvas, 9 windows, per chip) 2.39 GiB:
  python main.py --mode=compile --config=configs/segment_ade20k_vit_b16.py --topology=v5p-16 --workdir=/tmp/compile
"""
import ml_collections
from ml_collections import config_dict

from configs import common
from input_pipeline import config as input_config


def get_config(arg: str = ""):
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "segment"  # what main.py runs (dtm_jax/registry.py)
  c.allow_config_change = False  # resume a workdir whose checkpoint has another config (dtm_jax/runner/resume.py)
  c.seed = 0
  c.pretrained = dict(workdir="", step=config_dict.placeholder(int))  # step: None = latest; workdir "": random init.
  # The student --mode=compile assumes (it reads no checkpoint; runs take the architecture from the checkpoint), and
  # the trunk of the from-scratch baseline.
  c.pretrained.architecture = common.pretrain_config().model.to_dict()
  # Overrides of the pretrained student's ViTConfig; remat: "none", "dots" or "full" (see configs/common.py).
  c.model = dict(drop_path_rate=0.15, dtype="bfloat16", remat="none")
  c.segmenter = dict(num_classes=150, out_indices=(3, 5, 7, 11), channels=768, pool_scales=(1, 2, 3, 6),
                     aux_channels=256, aux_in_index=2, aux_weight=0.4, dropout=0.1, ignore_index=255)
  c.input = input_config.segment_config()  # ADEChallengeData2016 folder, mmseg's training pipeline
  c.crop_size = 512
  c.batch_size = 16
  c.eval_batch_size = 16
  c.total_steps = 160_000
  c.warmup_steps = 1500
  c.optim = dict(base_lr=5e-5, lr_scaling="none", lr_reference_batch=16, min_lr=0.0, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.05, no_decay_names=(), grad_clip=0.0, layer_decay=0.75, schedule="poly",
                 poly_power=1.0)
  # Sliding-window evaluation on a canvas_size² canvas; num_images 0 = the whole eval split.
  c.eval = dict(window=512, stride=341, canvas_size=1024, scales=(1.0,), flip=False, num_images=0)
  c.eval_every_steps = 16_000  # mmseg's schedule_160k evaluates every 16k iterations
  c.keep_checkpoints = 2
  c.log_every = 100
  c.progress_every_secs = 60.0
  c.stop_after_step = config_dict.placeholder(int)  # stop (with a checkpoint) at this step; rerun to go on
  c.mesh = dict(data=-1, fsdp=1, min_fsdp_size=2 ** 18)
  return c
