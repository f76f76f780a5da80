"""Data: image reading, splits and the tf.data input pipeline."""
