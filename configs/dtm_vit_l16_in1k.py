"""DTM ViT-L/16 on ImageNet-1K, 300 epochs, CLIP ViT-B/16 teacher.

Command:
  python main.py --config=configs/dtm_vit_l16_in1k.py --workdir=$WORKDIR \
      --config.target.checkpoint=$CLIP_DIR --config.input.data_dir=$TFDS_DATA_DIR
Expected result (paper): 86.7% ImageNet-1K top-1 after fine-tuning (fine-tune: 50 epochs, layer decay 0.8).
Layer scale 1e-5 (BEiT v2's L value; the paper's B value is 0.1); drop path and β2 by schedule length as for B/16
(300 epochs: 0.0 and 0.98; `:epochs=800`: 0.1 and 0.999; BEiT v2's guidance, the same for its L); docs/METHOD.md §6.
Slices (the step compiled with --mode=compile, docs/BENCHMARKS.md "Compiled for TPU"): v5p-64 (32 chips, 64 images
each): 23.2 GiB of 95 with plain data parallelism, the default. FSDP over the 32 chips (--config.mesh.fsdp=32)
shards the 3.7 GiB of parameters and optimizer state but the gathered weights come back as temporaries (23.0 GiB in
all) and it adds 146 all-gathers per step (roofline 98 vs 91 ms), so it is off by default: use it, or
--config.model.remat=dots, where a slice's chips have less HBM (search with --mode=compile --fit).
"""
from configs import common


def get_config(arg: str = ""):
  args = dict(kv.split("=") for kv in arg.split(",") if kv)
  c = common.pretrain_config()
  c.model.variant = "large"
  c.model.layer_scale_init = 1e-5
  return common.set_epochs(c, int(args.get("epochs", 300)))
