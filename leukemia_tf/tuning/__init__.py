"""Hyperparameter and architecture search with KerasTuner over the training engine.

* :mod:`~leukemia_tf.tuning.search_space`: the search flags (:class:`SearchConfig`)
  and the space they define over :class:`~leukemia_tf.training.config.TrainConfig`.
* :mod:`~leukemia_tf.tuning.tuner`: the KerasTuner ``HyperModel`` and the ``Tuner``
  whose trials are runs of :func:`leukemia_tf.training.train_lib.train`.
* :mod:`~leukemia_tf.tuning.results`: the results table and the best flagfile.
* :mod:`~leukemia_tf.tuning.tune_lib`: :func:`run_search` (``python -m leukemia_tf.tune``)
  and :func:`retrain_best`.

Import the submodules directly: they import TensorFlow and KerasTuner.
"""
