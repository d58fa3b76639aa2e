"""Fine-tuning a DTM ViT-B/16 student on iNaturalist 2018 (TFDS `i_naturalist2018`) at 224² or 384².

Command (the argument is the image size, 224 when omitted):
  python main.py --mode=finetune --config=configs/finetune_inat18.py:384 --workdir=$WORKDIR/inat18_384 \
      --config.pretrained.workdir=$WORKDIR --config.input.data_dir=$TFDS_DATA_DIR
Data: 8,142 species, 437,513 training and 24,426 validation images (the `train` and `validation` splits; `test` has
no labels). TFDS downloads the competition's archives (over 100 GB) and prepares them once:
  python -c "import tensorflow_datasets as tfds; \
      tfds.builder('i_naturalist2018', data_dir='$TFDS_DATA_DIR').download_and_prepare()"
Recipe: the DTM paper evaluates iNaturalist transfer, but its fine-tuning settings were not available to check (the
released code, naver-ai/dtm, documents ImageNet fine-tuning only). So this is DTM's ImageNet fine-tuning recipe
(configs/finetune_vit_b16_in1k.py, BEiT v2's: AdamW lr 5e-4 at batch 1024, layer decay 0.65, drop path 0.1,
Mixup/CutMix, RandAugment, random erasing, label smoothing 0.1, 100 epochs with 20 of warm-up) on iNat's images,
evaluated on the validation split. At 384² the classifier's position tables are resized from the student's 14×14 grid
and evaluation uses crop_pct 1.0 (configs/finetune_vit_b16_in1k_384.py, which also gives its memory on a slice). An
epoch is ~1/3 of an ImageNet one.
Expected result: not measured here (compare with the DTM paper's iNat 2018 entry). For reference, MAE's ViT-B/16
reaches 75.4% top-1 on iNat 2018 at 224² (ViT-L/16 80.1%, ViT-H/14 at 448² 86.8%; facebookresearch/mae README).
"""
from configs import finetune_vit_b16_in1k
from configs import finetune_vit_b16_in1k_384

IMAGE_SIZES = (224, 384)


def get_config(arg: str = ""):
  image_size = int(arg or 224)
  if image_size not in IMAGE_SIZES:
    raise ValueError(f"configs/finetune_inat18.py takes the image size, one of {IMAGE_SIZES} (e.g. "
                     f"--config=configs/finetune_inat18.py:384), not {arg!r}.")
  c = finetune_vit_b16_in1k.get_config()
  c.input.dataset = "i_naturalist2018"
  c.input.train_split = "train"
  c.input.eval_split = "validation"
  c.num_classes = 8142
  c.num_train_examples = 437_513
  return finetune_vit_b16_in1k_384.at_image_size(c, image_size)
