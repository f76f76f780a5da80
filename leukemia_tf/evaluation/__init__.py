"""Evaluation of trained models: metrics, calibration, aggregation, figures, explanations.

The command is ``python -m leukemia_tf.evaluate``; its library function is
:func:`leukemia_tf.evaluation.evaluate_lib.evaluate`. Slide and patient
aggregation (:func:`leukemia_tf.evaluation.aggregate.aggregate`) is shared
with ``leukemia_tf.predict``.
"""
