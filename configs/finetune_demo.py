"""Fine-tuning the demo student on Fashion-MNIST on the CPU (the ImageNet recipe, scaled down).

Command (after `make demo`, which pretrains into workdirs/demo):
  python main.py --mode=finetune --config=configs/finetune_demo.py --workdir=workdirs/demo/finetune \
      --config.pretrained.workdir=workdirs/demo
Rerunning the same command resumes (or, once finished, just reports).
Expected result: a top-1 accuracy well above chance (10%); not yet measured on a demo checkpoint in this session.
"""
import ml_collections
from ml_collections import config_dict

from configs import demo


def get_config(arg: str = ""):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.pretrained = dict(workdir="workdirs/demo", step=config_dict.placeholder(int))  # step: None = latest.
  c.model = dict(drop_path_rate=0.1)  # Overrides of the pretrained student's ViTConfig.
  c.input = demo.get_config().input  # The pretraining source and normalisation.
  c.input.eval_split = "test"
  # Milder augmentation than ImageNet's for 28-pixel images and a short run (crop scale 0.08 and RandAugment m9 cost
  # ~10 points after 1 epoch).
  c.input.update(finetune_crop_scale_min=0.35, randaug_num_layers=1, randaug_magnitude=5.0)
  c.num_classes = 10
  c.num_train_examples = 60_000
  c.pooling = "mean"
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.epochs = 2
  c.warmup_epochs = 0.5
  c.optim = dict(base_lr=2e-3, lr_scaling="none", lr_reference_batch=1024, min_lr=1e-6, b1=0.9, b2=0.999,
                 eps=1e-8, weight_decay=0.05, no_decay_names=("cls_token", "pos_embed"), grad_clip=0.0,
                 layer_decay=0.75)
  c.mix = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1)
  c.ema_decay = 0.0
  c.eval_every_epochs = 1
  c.keep_checkpoints = 2
  c.log_every = 100
  c.progress_every_secs = 20.0
  c.mesh = dict(data=-1, fsdp=1, min_fsdp_size=2 ** 18)
  return c
