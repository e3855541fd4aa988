"""tf.data / TFDS input pipelines: the only place that reads data files."""
