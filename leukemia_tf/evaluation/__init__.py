"""Evaluation of trained models: metrics, calibration, aggregation, figures, explanations.

The command is ``python -m leukemia_tf.evaluate``; its library function is
:func:`leukemia_tf.evaluation.evaluate_lib.evaluate`. Slide and patient
aggregation (:func:`leukemia_tf.evaluation.aggregate.aggregate`) is shared
with ``leukemia_tf.predict``.

An evaluation reads and predicts the split in ``predictions``, computes the
scored sections of ``metrics.json`` in ``sections`` and draws the figures and
explanations in ``figure_sections``; ``evaluate_lib`` runs them in order and
writes ``metrics.json`` and the report (worded in ``report``).
"""
