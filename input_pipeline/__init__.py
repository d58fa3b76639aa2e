"""tf.data input pipelines. The only package of this project that imports TensorFlow.

  from input_pipeline import default_config, build_pretrain, build_eval, build_finetune_train
  from input_pipeline import segment_config, build_segment_train, build_segment_eval

Modules: `config` (the `input` ConfigDict), `sources` (TFDS, image folders, Fashion-MNIST),
`transforms` and `randaugment` (per-image TF ops), `masking` (BEiT block masks, numpy),
`pipeline` (per-host tf.data assembly), `iterators` (numpy batches, save/restore), `segmentation` and
`segment_sources` (semantic segmentation: ADE20K, Fashion-MNIST canvases).

TensorFlow is imported only when a pipeline is built (the `build_*` names are loaded on first use): configs, which
need `default_config`, load on hosts without TensorFlow (GPU machines, `--mode=compile`).
"""
from input_pipeline.config import default_config
from input_pipeline.config import segment_config

_PIPELINE_NAMES = ("build_eval", "build_finetune_train", "build_pretrain")
_SEGMENTATION_NAMES = ("build_segment_eval", "build_segment_train")
__all__ = ["default_config", "segment_config", *_PIPELINE_NAMES, *_SEGMENTATION_NAMES]


def __getattr__(name):
  if name in _PIPELINE_NAMES:
    from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
    return getattr(pipeline, name)
  if name in _SEGMENTATION_NAMES:
    from input_pipeline import segmentation  # pylint: disable=g-import-not-at-top
    return getattr(segmentation, name)
  raise AttributeError(f"module 'input_pipeline' has no attribute {name!r}")
