"""DTM with an MAE-style ViT-B/16 student on ImageNet-1K, CLIP ViT-B/16 teacher (the paper's "DTM on MAE with CLIP
targets", docs/METHOD.md §9).

Command (one host; on a pod run the same command on every host):
  python main.py --config=configs/dtm_mae_vit_b16_in1k.py --workdir=$WORKDIR \
      --config.target.checkpoint=$CLIP_DIR --config.input.data_dir=$TFDS_DATA_DIR
`:epochs=1600` gives MAE's long schedule; `--config.dtm.enabled=False` the token-wise baseline (MAE with CLIP
targets); `--config.dtm.loss_positions=masked` scores the hidden patches only (MAE's pixel loss does). Fine-tune,
probe and segment the encoder with the BEiT-style configs (configs/finetune_vit_b16_in1k.py, ...): evaluations
restore its encoder as the trunk and drop the decoder.
Expected result (paper, Table 7): +0.5 fine-tuning top-1 over the token-wise MAE student with CLIP targets; the
paper publishes neither the recipe nor the absolute figure. Not run here.
The encoder's recipe is MAE's (He et al. 2022, Table 8): batch 4096, lr 1.5e-4 × batch / 256 (cosine to 0), AdamW
β = (0.9, 0.95), weight decay 0.05, 40 warm-up epochs, no drop path, no gradient clipping, random-resized crops of
scale [0.2, 1] with flips, 75% of the patches hidden at random per image, a decoder of 8 blocks of width 512 with 16
heads. Our choices where the DTM paper gives none: 800 epochs (MAE's ablation length; `:epochs=1600` its longest),
the DTM settings of configs/common.py (2 schedules, up to 14 rounds, one draw per 256 images, smooth-L1 with β = 2,
every position scored as the released code does), the trunk's initialisation and its BEiT-style q/v biases (MAE uses
xavier-uniform linears and full qkv biases; the decoder's blocks here have full qkv biases). The position tables are
fixed sin-cos in pretraining (MAE) and ordinary trunk parameters in fine-tuning.
The pipeline still draws its block-wise BEiT mask; the MAE-style step ignores it and draws its own on the device.
"""
from configs import common

MAE_FIELDS = dict(kind="mae", abs_pos_emb=True, block_rel_pos_bias=False, shared_rel_pos_bias=False,
                  layer_scale_init=0.0, mask_ratio=0.75, decoder_width=512, decoder_depth=8, decoder_num_heads=16)


def mae_student(c):
  """The MAE-style student's fields on a pretraining config (its encoder keeps `variant` and the other fields)."""
  c.model.update(MAE_FIELDS)
  return c


def get_config(arg: str = ""):
  args = dict(kv.split("=") for kv in arg.split(",") if kv)
  c = mae_student(common.pretrain_config())
  c.model.drop_path_rate = 0.0
  c.batch_size = 4096
  c.total_epochs = int(args.get("epochs", 800))
  c.warmup_epochs = 40
  c.optim.update(base_lr=1.5e-4, lr_scaling="linear", lr_reference_batch=256, min_lr=0.0, b1=0.9, b2=0.95,
                 weight_decay=0.05, grad_clip=0.0)
  return c
