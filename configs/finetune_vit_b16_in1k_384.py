"""Fine-tuning a DTM ViT-B/16 student, pretrained at 224², on ImageNet-1K at 384² (BEiT's higher-resolution recipe).

Command:
  python main.py --mode=finetune --config=configs/finetune_vit_b16_in1k_384.py --workdir=$WORKDIR/finetune_384 \
      --config.pretrained.workdir=$WORKDIR --config.input.data_dir=$TFDS_DATA_DIR
The recipe of configs/finetune_vit_b16_in1k.py (BEiT v2's, which DTM reuses) with two changes, as BEiT fine-tunes
at 384² ("set --input_size 384", unilm/beit get_started_for_image_classification.md): the classifier is built at 384²
(24×24 patches; the student's relative-position tables are resized from 14×14 by BEiT's geometric-progression
interpolation, dtm_jax/models/position_resize.py), and evaluation resizes the shorter side to 384 and centre-crops
(crop_pct 1.0, BEiT's choice from 384² up; 0.875 below). Tokens grow from 197 to 577, so a step costs ~3.2× the
FLOPs of the 224² one. Slices (--mode=compile, 2026-12-03): v5p-32 (16 chips, 64 images each): 32.8 GiB of 95, no
remat, no FSDP; roofline step ≥ 112 ms (224²: 32 ms).
Expected result: no 384² result is published for DTM; for scale, BEiT's ViT-B/16 (ImageNet-22k pretraining and
intermediate fine-tuning) reaches 86.8% at 384² (unilm/beit get_started_for_image_classification.md).
"""
from configs import finetune_vit_b16_in1k

# BEiT's evaluation crop: crop_pct 224/256 below 384², 1.0 (resize to the size, centre crop) from 384² up.
_FULL_CROP_FROM = 384


def at_image_size(config, image_size: int):
  """A fine-tuning config at `image_size`: the classifier's size and BEiT's evaluation crop for it."""
  config.model.image_size = image_size
  if image_size >= _FULL_CROP_FROM:
    config.input.crop_pct = 1.0
  return config


def get_config(arg: str = ""):
  del arg
  return at_image_size(finetune_vit_b16_in1k.get_config(), 384)
