"""Tiny pretraining for tests and smoke checks: 16² images, patch 4 (16 tokens), 2-block student and teacher.

Command:
  python main.py --config=configs/test_tiny.py --workdir=/tmp/dtm_tiny
  python main.py --config=configs/test_tiny.py:source=fashion_mnist --workdir=/tmp/dtm_tiny_fm
  python main.py --config=configs/test_tiny.py:kind=mae --workdir=/tmp/dtm_tiny_mae  # the MAE-style student
Expected result: 20 steps in well under a minute on 2 CPU cores; the loss falls over the run (random-init teacher,
so the number itself means nothing). `source=synthetic` (default) needs no files and no TensorFlow decoding.
"""
from configs import common, dtm_mae_vit_b16_in1k


def get_config(arg: str = ""):
  args = dict(kv.split("=") for kv in arg.split(",") if kv)
  c = common.pretrain_config()
  c.model.update(variant="test", image_size=16, patch_size=4, drop_path_rate=0.0, out_dim=16, dtype="float32")
  c.target.update(kind="clip", init="random", variant="test", overrides={"patch_size": 4}, dtype="float32")
  if args.get("kind", "beit") == "mae":  # 12 of 16 patches hidden, a 1-block decoder of width 32
    dtm_mae_vit_b16_in1k.mae_student(c).model.update(decoder_width=32, decoder_depth=1, decoder_num_heads=2)
  c.input = common.input_config(source=args.get("source", "synthetic"), num_masking_patches=6, min_num_patches=2)
  c.batch_size = 16
  c.total_steps = 20
  c.warmup_steps = 2
  c.optim.base_lr = 2e-3
  c.optim.lr_scaling = "none"
  c.dtm.max_iters = 4
  c.dtm.schedule_group_size = 8  # two schedule draws per batch, each spanning devices
  c.log_every = 5
  c.checkpoint_every = 10
  c.progress_every_secs = 5.0
  c.metrics_flush_secs = 0.0  # every line at once: the subprocess tests watch metrics.jsonl to time their signals
  return c
