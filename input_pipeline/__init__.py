"""tf.data input pipelines. The only package of this project that imports TensorFlow.

  from input_pipeline import default_config, build_pretrain, build_eval, build_finetune_train

Modules: `config` (the `input` ConfigDict), `sources` (TFDS, image folders, Fashion-MNIST),
`transforms` and `randaugment` (per-image TF ops), `masking` (BEiT block masks, numpy),
`pipeline` (per-host tf.data assembly), `iterators` (numpy batches, save/restore).
"""
import tensorflow as tf

# JAX owns the accelerators: keep TensorFlow's runtime from claiming any GPU memory.
if tf.config.list_physical_devices("GPU"):
  tf.config.set_visible_devices([], "GPU")

# pylint: disable=g-import-not-at-top,wrong-import-position
from input_pipeline.config import default_config
from input_pipeline.pipeline import build_eval
from input_pipeline.pipeline import build_finetune_train
from input_pipeline.pipeline import build_pretrain
