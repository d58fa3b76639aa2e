"""DTM ViT-S/16 on ImageNet-1K, 300 epochs, CLIP ViT-B/16 teacher.

Command:
  python main.py --config=configs/dtm_vit_s16_in1k.py --workdir=$WORKDIR \
      --config.target.checkpoint=$CLIP_DIR --config.input.data_dir=$TFDS_DATA_DIR
Expected result: not reported by the paper for ViT-S; this recipe scales the ViT-B one (same lr rule, drop path and
β2 by schedule length).
We have not run it at full scale (no ImageNet here); report your number in docs/RESULTS.md.
Slices (the step compiled with --mode=compile, docs/BENCHMARKS.md "Compiled for TPU"): v5e-16 (16 chips, 128 images
each): 8.1 GiB of 16, no remat, no FSDP; any slice of more or larger chips holds it too.
"""
from configs import common


def get_config(arg: str = ""):
  args = dict(kv.split("=") for kv in arg.split(",") if kv)
  c = common.pretrain_config()
  c.model.variant = "small"
  return common.set_epochs(c, int(args.get("epochs", 300)))
