"""DTM: Dynamic Token Morphing masked-image-model pretraining in JAX/Flax NNX."""
