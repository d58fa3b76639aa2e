"""Fine-tuning a DTM ViT-B/16 student on ImageNet-1K (BEiT v2's recipe, which DTM reuses; docs/METHOD.md §6).

Command:
  python main.py --mode=finetune --config=configs/finetune_vit_b16_in1k.py --workdir=$WORKDIR/finetune \
      --config.pretrained.workdir=$WORKDIR --config.input.data_dir=$TFDS_DATA_DIR
Rerunning the same command resumes. Mean-pooled patch tokens → LayerNorm → linear head (×0.001 init); AdamW lr 5e-4 at
batch 1024, weight decay 0.05, layer-wise lr decay 0.65, drop path 0.1, mixup 0.8, CutMix 1.0, label smoothing 0.1,
RandAugment m9 mstd 0.5 and random erasing 0.25 (input block), 100 epochs with 20 warm-up; evaluation at resize 256
→ centre crop 224. For ViT-L/16 use --config.optim.layer_decay=0.8 --config.epochs=50.
Expected result (paper): 85.4% top-1 after 300 pretraining epochs (85.5% after 800; ViT-L/16 86.7%).
Slices (the step compiled with --mode=compile, docs/BENCHMARKS.md "Compiled for TPU"): v5p-32 (16 chips, 64 images
each): 8.6 GiB of 95, no remat, no FSDP.
"""
import ml_collections
from ml_collections import config_dict

from configs import common


def get_config(arg: str = ""):
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "finetune"  # what main.py runs (dtm_jax/registry.py)
  c.allow_config_change = False  # resume a workdir whose checkpoint has another config (dtm_jax/runner/resume.py)
  c.seed = 0
  c.pretrained = dict(workdir="", step=config_dict.placeholder(int))  # step: None = latest.
  # The student --mode=compile assumes (it reads no checkpoint; runs take the architecture from the checkpoint).
  c.pretrained.architecture = common.pretrain_config().model.to_dict()
  # Overrides of the pretrained student's ViTConfig; remat: "none", "dots" or "full" (see configs/common.py).
  c.model = dict(drop_path_rate=0.1, dtype="bfloat16", remat="none")
  c.input = common.input_config()
  c.num_classes = 1000
  c.num_train_examples = 1_281_167
  c.pooling = "mean"  # "mean" (BEiT: fc_norm over mean-pooled patch tokens) or "cls".
  c.batch_size = 1024
  c.eval_batch_size = 1024
  c.epochs = 100
  c.warmup_epochs = 20
  # AdamW; lr = base_lr × batch / 1024. grad_clip 0: BEiT v2 fine-tunes without clipping.
  c.optim = dict(base_lr=5e-4, lr_scaling="linear", lr_reference_batch=1024, min_lr=1e-6, b1=0.9, b2=0.999,
                 eps=1e-8, weight_decay=0.05, no_decay_names=("cls_token", "pos_embed"), grad_clip=0.0,
                 layer_decay=0.65)
  c.mix = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1)
  c.ema_decay = 0.0  # > 0 also keeps (and evaluates) an exponential moving average of the weights, e.g. 0.9999.
  c.eval_every_epochs = 1
  c.keep_checkpoints = 2
  c.log_every = 100
  c.progress_every_secs = 60.0
  c.mesh = dict(data=-1, fsdp=1, min_fsdp_size=2 ** 18)
  return c
