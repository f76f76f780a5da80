"""Learning-rate schedules."""

from __future__ import annotations

import math

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="leukemia_tf")
class TwoStageWarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up then cosine decay, restarted (at a lower peak) when the backbone unfreezes.

    Stage 1 covers steps ``[0, stage1_steps)`` at ``peak_lr``; stage 2 covers
    the rest at ``peak_lr * stage2_factor``. Each stage warms up linearly for
    ``warmup_steps`` (at most half the stage) and decays with a cosine to
    ``min_ratio`` of its peak. ``stage1_steps=0`` is plain warm-up + cosine.

    Args:
      peak_lr: peak learning rate of stage 1 (or of the only stage).
      total_steps: steps of the whole run.
      warmup_steps: warm-up length of each stage.
      min_ratio: final learning rate as a fraction of the stage's peak.
      stage1_steps: steps with the frozen backbone; 0 for none.
      stage2_factor: peak of stage 2 relative to ``peak_lr``.
    """

    def __init__(
        self,
        peak_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        min_ratio: float = 0.0,
        stage1_steps: int = 0,
        stage2_factor: float = 1.0,
    ):
        self.peak_lr = float(peak_lr)
        self.total_steps = int(max(total_steps, 1))
        self.warmup_steps = int(max(warmup_steps, 0))
        self.min_ratio = float(min_ratio)
        self.stage1_steps = int(max(stage1_steps, 0))
        self.stage2_factor = float(stage2_factor)

    def _stage(self, step, length, peak):
        length = tf.maximum(tf.cast(length, tf.float32), 1.0)
        warmup = tf.minimum(tf.cast(self.warmup_steps, tf.float32), length / 2.0)
        warm = peak * (step + 1.0) / tf.maximum(warmup, 1.0)
        progress = tf.clip_by_value((step - warmup) / tf.maximum(length - warmup, 1.0), 0.0, 1.0)
        cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
        decayed = peak * (self.min_ratio + (1.0 - self.min_ratio) * cosine)
        return tf.where(step < warmup, warm, decayed)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        s1 = float(self.stage1_steps)
        stage1 = self._stage(step, s1, self.peak_lr)
        # Without a frozen stage the whole run is "stage 2" at the full peak.
        factor = self.stage2_factor if self.stage1_steps > 0 else 1.0
        stage2 = self._stage(step - s1, self.total_steps - self.stage1_steps, self.peak_lr * factor)
        return tf.where(step < s1, stage1, stage2)

    def get_config(self):
        return {
            "peak_lr": self.peak_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "min_ratio": self.min_ratio,
            "stage1_steps": self.stage1_steps,
            "stage2_factor": self.stage2_factor,
        }
