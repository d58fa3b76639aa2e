"""The pretraining config every recipe starts from: DTM's ViT-B/16 ImageNet-1K recipe (docs/METHOD.md §6).

Recipes override what differs. Values the paper does not publish are marked "unpublished" with the choice made and
its source; docs/METHOD.md "Recipe" tabulates every value beside the released code's, its docs' and BEiT v2's.
"""
import ml_collections
from ml_collections import config_dict


def pretrain_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "pretrain"  # what main.py runs (dtm_jax/registry.py)
  c.seed = 0

  # Student: BEiT-style ViT (docs/METHOD.md §4). dtype is the compute dtype (matmul and attention inputs); parameters,
  # the residual stream and LayerNorm statistics are float32. attention_impl None picks per platform: cuDNN's fused
  # kernel on GPUs (bf16), XLA on TPUs, the native kernel on CPUs; or "xla" / "cudnn" / "cpu".
  # remat: what the backward pass recomputes — "none", "dots" (keeps the matmul outputs) or "full".
  # kind: "beit" (mask tokens in the encoder, the pipeline's block-wise mask) or "mae" (encoder on the visible
  # patches, light decoder: dtm_jax/models/mae.py; configs/dtm_mae_vit_b16_in1k.py adds its fields).
  c.model = dict(
      kind="beit", variant="base", image_size=224, patch_size=16, drop_path_rate=0.0,  # unpublished: see set_epochs
      layer_scale_init=0.1, out_dim=512, abs_pos_emb=False, block_rel_pos_bias=True, shared_rel_pos_bias=True,
      dtype="bfloat16", attention_impl=config_dict.placeholder(str), remat="none")

  # Target: frozen CLIP ViT-B/16 converted with `python -m dtm_jax.models.convert` (see README).
  c.target = dict(
      # dtype "auto": float32 on TPUs (no dearer than bf16 there), float16 on GPUs (the released code's autocast);
      # measured in docs/BENCHMARKS.md "Teacher precision".
      kind="clip", checkpoint="", init="checkpoint", dtype="auto",
      head_dtype=config_dict.placeholder(str),  # clip: ln_post and proj dtype when not `dtype`
      variant="B/16", overrides={}, seed=0,  # used by init="random" only
      features="head", step=config_dict.placeholder(int),  # used by kind="checkpoint" only
      normalize_patches=True,  # used by kind="pixels" only
      ema_momentum=0.996, ema_momentum_end=1.0)  # used by kind="ema" only

  # Dynamic token morphing (docs/METHOD.md §2–3); enabled=False is token-wise distillation.
  # fixed_schedule=(num_merge, num_iters) replaces the random draw (the paper's "no dynamic schedule" ablation).
  # schedule_group_size: images that share one schedule draw; the released code draws once per GPU per step and its
  # 8-GPU run has 256 images per GPU. 1: a draw per image; -1: one draw for the whole global batch.
  # loss_positions: "all" scores every patch (the released code), "masked" only the hidden ones (MAE's loss).
  c.dtm = dict(enabled=True, num_schedules=2, max_merge=-1, max_iters=14, schedule_group_size=256,
               protect_first=True, loss="smooth_l1", beta=2.0, normalize_target=False, weighting="token",
               loss_positions="all",
               fixed_schedule=config_dict.placeholder(tuple))

  c.input = input_config(crop_scale_min=0.2)  # crop scale min 0.2: unpublished (BEiT v2; released code: 0.08).

  c.batch_size = 2048  # unpublished (BEiT v2's norm).
  c.grad_accum_steps = 1
  c.num_train_examples = 1_281_167
  c.total_epochs = 300
  c.warmup_epochs = 10  # unpublished.
  c.total_steps = config_dict.placeholder(int)  # set to override the epoch counts
  c.warmup_steps = config_dict.placeholder(int)

  c.optim = dict(base_lr=1.5e-3, lr_scaling="sqrt", lr_reference_batch=2048, min_lr=1e-5,
                 b1=0.9, b2=0.98,  # unpublished: see set_epochs
                 eps=1e-8, weight_decay=0.05, no_decay_names=("cls_token", "pos_embed"), grad_clip=3.0,
                 layer_decay=1.0)

  c.mesh = dict(data=-1, fsdp=1, min_fsdp_size=2 ** 18)
  c.log_every = 50
  c.progress_every_secs = 60.0
  c.metrics_flush_secs = 30.0  # metrics.jsonl/TensorBoard written out every this many seconds and at checkpoints
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.allow_config_change = False
  c.stop_after_step = config_dict.placeholder(int)  # checkpoint and exit after this step (time-limited jobs)
  c.profile = dict(start_step=10, num_steps=0)  # num_steps > 0 writes a jax.profiler trace to workdir/profile
  # kNN (DINO protocol) every `every` steps (0: never) on slices of the train split (bank) and eval split (queries).
  c.eval = dict(every=0, k=20, temperature=0.07, batch_size=1024, train_split="train", eval_split="validation",
                num_train_examples=50_000, num_eval_examples=10_000)
  return c


# BEiT v2's guidance by schedule length (its PRETRAINING.md, which DTM's code was forked from; DTM's docs/Training.md
# leaves both as placeholders): drop path 0.0 and β2 0.98 for 300 epochs, 0.1 and 0.999 for 1600. Schedules of 800
# epochs and longer take the long values; shorter ones the 300-epoch values.
LONG_SCHEDULE_EPOCHS = 800
SHORT_SCHEDULE = dict(drop_path_rate=0.0, b2=0.98)
LONG_SCHEDULE = dict(drop_path_rate=0.1, b2=0.999)


def set_epochs(c: ml_collections.ConfigDict, epochs: int) -> ml_collections.ConfigDict:
  """Sets the schedule length and the drop path and β2 that go with it (BEiT v2's guidance, above)."""
  values = LONG_SCHEDULE if epochs >= LONG_SCHEDULE_EPOCHS else SHORT_SCHEDULE
  c.total_epochs = epochs
  c.model.drop_path_rate = values["drop_path_rate"]
  c.optim.b2 = values["b2"]
  return c


def input_config(**overrides) -> ml_collections.ConfigDict:
  """The input block (input_pipeline's defaults: ImageNet from TFDS) with overrides; loads without TensorFlow."""
  from input_pipeline import config as input_config_lib  # pylint: disable=g-import-not-at-top
  cfg = input_config_lib.default_config()
  cfg.update(overrides)
  return cfg
