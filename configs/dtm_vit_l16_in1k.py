"""DTM ViT-L/16 on ImageNet-1K, 300 epochs, CLIP ViT-B/16 teacher.

Command (parameters and optimizer state sharded over all devices, FSDP):
  python main.py --config=configs/dtm_vit_l16_in1k.py --workdir=$WORKDIR \
      --config.target.checkpoint=$CLIP_DIR --config.input.data_dir=$TFDS_DATA_DIR
Expected result (paper): 86.7% ImageNet-1K top-1 after fine-tuning (fine-tune: 50 epochs, layer decay 0.8).
Layer scale 1e-5 (common for L; the paper's B value is 0.1) and drop path 0.1 are our choices (unpublished for L).
"""
from configs import common


def get_config(arg: str = ""):
  args = dict(kv.split("=") for kv in arg.split(",") if kv)
  c = common.pretrain_config()
  c.model.variant = "large"
  c.model.layer_scale_init = 1e-5
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.total_epochs = int(args.get("epochs", 300))
  return c
