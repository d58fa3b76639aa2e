"""The `input` block of a run config: every knob of the input pipeline, with defaults.

Run configs start from `default_config()` and override fields, e.g. the demo:
  config.input = input_pipeline.default_config()
  config.input.source = "fashion_mnist"
  config.input.eval_split = "test"
  config.input.num_masking_patches = 19      # ~40% of a 7x7 grid
"""
import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_config():
  """ImageNet-1K pretraining and evaluation settings of docs/METHOD.md §6."""
  c = ml_collections.ConfigDict()

  # --- Where the images come from.
  # "tfds": a TFDS builder (`dataset`), prepared under `data_dir` (None: TFDS's default dir).
  # "folder": `data_dir/<split>/<class>/*.{jpg,jpeg,png}`; labels index the sorted class
  #   folders of `train_split` (the same class list serves every split).
  # "fashion_mnist": the IDX files in `data_dir` (None: /usr/share/datasets/fashion-mnist,
  #   Debian's dataset-fashion-mnist); splits "train" and "test"; grey is fed as RGB.
  c.source = "tfds"
  c.dataset = "imagenet2012"
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.train_split = "train"
  c.eval_split = "validation"
  # TFDS only: encoded examples held for shuffling after the file-level shuffle. It bounds
  # host RAM and the iterator checkpoint (~110 KB per ImageNet example, so ~1.1 GB here).
  # Folders and IDX files need no buffer: they are read in a fresh permutation every epoch.
  c.shuffle_buffer = 10_000

  # --- Pretraining views (docs/METHOD.md §6): RandomResizedCrop -> flip -> colour jitter.
  c.crop_scale_min = 0.08   # The released code's default; BEiT v2 uses 0.2.
  c.flip = True             # Random horizontal flip (pretraining and fine-tuning).
  c.color_jitter = 0.4      # Brightness, contrast and saturation strength; 0 turns it off.
  # The released order instead: jitter and flip the whole decoded image, then crop (contrast pivots on the whole
  # image's mean). Costs CPU time per image (docs/BENCHMARKS.md "Input pipeline"); see docs/METHOD.md §8.3.
  c.jitter_before_crop = False
  c.mean = IMAGENET_MEAN    # Normalisation of [0, 1] RGB, for student and teacher alike.
  c.std = IMAGENET_STD
  # Every crop is resized bicubically. Antialiased shrinking is what PIL (so the released
  # code) does; False saves ~1/3 of the CPU time per image and aliases a little (all views).
  c.resize_antialias = True

  # --- BEiT block-wise mask over the patch grid.
  c.num_masking_patches = 75   # Exactly this many patches are masked in every image.
  c.min_num_patches = 16       # Smallest block area BEiT aims for.
  c.min_mask_aspect = 0.3      # Block aspect ratios lie in [0.3, 1 / 0.3].

  # --- Evaluation and fine-tuning (BEiT v2's recipe that DTM reuses).
  c.crop_pct = 0.875                  # Resize the shorter side to size / crop_pct, centre crop.
  c.finetune_crop_scale_min = 0.08
  c.randaug_num_layers = 2            # RandAugment "rand-m9-mstd0.5-inc1"; 0 turns it off.
  c.randaug_magnitude = 9.0
  c.randaug_magnitude_std = 0.5
  c.random_erase_prob = 0.25          # One erased box of per-pixel normal noise.

  # --- Throughput and host resources.
  c.num_parallel_calls = -1   # Images decoded and augmented at once; -1 = tf.data AUTOTUNE.
  c.prefetch = 2              # Batches kept ready ahead of the training step.
  c.threadpool_size = 0       # Threads of the pipeline's private pool; 0 = TF's shared pool.
  return c


def segment_config():
  """Semantic segmentation input (mmseg's ADE20K 512x512 recipe), for `build_segment_train` / `build_segment_eval`.

  Crop and evaluation canvas sizes are arguments of the builders (the run config's model side chooses them).
  The offline demo task: source="fashion_mnist_segmentation", train_split="train", eval_split="test",
  reduce_zero_label=False (its class 0 is the background, a real class), scale=(size, size) for `size` px inputs.
  """
  c = ml_collections.ConfigDict()

  # --- Where the images and label maps come from.
  # "ade20k_folder": `data_dir`/ADEChallengeData2016/{images,annotations}/<split>/ (the released zip; README: ADE20K).
  # "tfds": a TFDS builder (`dataset`) with "image" and "annotation" features, prepared under `data_dir`. TFDS's
  #   scene_parse150 splits are "train" and "test" (ADE20K's validation images), and its annotations are the 2017
  #   instance masks (first channel: 100 object categories, 0 elsewhere), not the 150-class benchmark labels.
  # "fashion_mnist_segmentation": 2x2 canvases of Fashion-MNIST garments (11 classes, 0 = background) from the IDX
  #   files in `data_dir` (None: /usr/share/datasets/fashion-mnist); splits "train" and "test".
  c.source = "ade20k_folder"
  c.dataset = "scene_parse150"
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.train_split = "training"
  c.eval_split = "validation"
  c.shuffle_buffer = 2_000       # TFDS only: encoded examples held for shuffling (~130 KB each on ADE20K).
  # ADE20K's label 0 is "other": it becomes 255 (ignored) and classes 1..150 become 0..149, once, when decoded.
  c.reduce_zero_label = True

  # --- Training views (mmseg): keep-ratio resize into scale x uniform(ratio_range), a crop_size crop whose largest
  # class covers less than cat_max_ratio of its labelled pixels (10 tries), flip, photometric distortion, padding
  # (image: the mean colour, i.e. 0 after normalisation; label: 255). Evaluation: keep-ratio resize into scale.
  c.scale = (2048, 512)          # (long side, short side) bounds of mmseg's keep-ratio resize.
  c.ratio_range = (0.5, 2.0)
  c.cat_max_ratio = 0.75         # 1.0 turns the check off.
  c.flip = True
  c.photometric = True           # mmseg's PhotoMetricDistortion: brightness, contrast, saturation, hue.
  c.mean = IMAGENET_MEAN         # Applied on the device (dtm_jax.images); the padding colour is the mean.
  c.std = IMAGENET_STD

  # --- Throughput and host resources (as in default_config).
  c.num_parallel_calls = -1
  c.prefetch = 2
  c.threadpool_size = 0
  return c
