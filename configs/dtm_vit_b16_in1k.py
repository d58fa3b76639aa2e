"""DTM ViT-B/16 on ImageNet-1K, 300 epochs, CLIP ViT-B/16 teacher (the paper's main recipe, docs/METHOD.md §6).

Command (one host; on a pod run the same command on every host):
  python main.py --config=configs/dtm_vit_b16_in1k.py --workdir=$WORKDIR \
      --config.target.checkpoint=$CLIP_DIR --config.input.data_dir=$TFDS_DATA_DIR
where $CLIP_DIR comes from
  python -m dtm_jax.models.convert --format=openai_clip --input=ViT-B-16.pt --output=$CLIP_DIR
Then fine-tune with configs/finetune_vit_b16_in1k.py.
Expected result (paper): 85.4% ImageNet-1K top-1 after fine-tuning (BEiT v2 85.0 at the same budget).
`:epochs=800` gives the 800-epoch run (paper: 85.5%).
Slices (the step compiled for each with --mode=compile, docs/BENCHMARKS.md "Compiled for TPU"; no remat, no FSDP):
v5p-32 (16 chips, 128 images each: 16.0 GiB of 95), and with the earlier bfloat16 teacher v4-32 (16 chips: 17.0 of
32 GiB) and v5e-64 (64 chips, 32 images each: 4.8 of 16 GiB). Check another slice first with
  python main.py --mode=compile --config=configs/dtm_vit_b16_in1k.py --topology=<slice> --workdir=/tmp/compile
Unpublished choices (configs/common.py; every value with its source in docs/METHOD.md §6): batch 2048, warmup 10
epochs, crop scale min 0.2 (BEiT v2; the released code defaults to 0.08), drop path and β2 by schedule length as BEiT
v2 advises (300 epochs: 0.0 and 0.98; `:epochs=800`: 0.1 and 0.999), one schedule draw per 256 images (the released
8-GPU run's per-GPU batch: 8 draws per step), the teacher in float32 on TPUs and float16 on GPUs
(`target.dtype="auto"`, chosen from the figures of docs/BENCHMARKS.md "Teacher precision": bfloat16 regroups 6% of
the semantic teacher's tokens, float16 1%; on v5p-32 the float32 teacher compiles to 15.97 GiB per chip and a 73 ms
roofline step, bfloat16 to 16.74 GiB and 75 ms).
"""
from configs import common


def get_config(arg: str = ""):
  args = dict(kv.split("=") for kv in arg.split(",") if kv)
  c = common.pretrain_config()
  return common.set_epochs(c, int(args.get("epochs", 300)))
