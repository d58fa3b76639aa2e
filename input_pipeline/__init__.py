"""tf.data input pipelines. The only package of this project that imports TensorFlow."""
