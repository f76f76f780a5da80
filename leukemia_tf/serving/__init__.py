"""Serving: the SavedModel export for TF Serving, its signatures and warmup requests.

* :mod:`leukemia_tf.serving.signatures`: the serving graph (decode, model,
  named outputs) shared by the export and ``leukemia_tf.predict``.
* :mod:`leukemia_tf.serving.export_lib`: ``export_model``, the library behind
  ``python -m leukemia_tf.export``.
* :mod:`leukemia_tf.serving.warmup`: ``assets.extra/tf_serving_warmup_requests``.

Submodules are imported on demand (they load TensorFlow).
"""
