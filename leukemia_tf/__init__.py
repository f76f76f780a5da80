"""leukemia_tf: leukemia classifiers for blood-cell microscopy, in TensorFlow/Keras."""

__version__ = "0.1.0"
