"""Helpers shared by the benchmark tools (no flags here: every tool defines its own)."""

from __future__ import annotations


def memory_input_fn(real_input_fn):
    """Wraps the engine's input function: one real batch, repeated from host memory."""
    import tensorflow as tf

    def make(config, specs, data_dir, taxonomy, image_dtype=tf.uint8):
        real = real_input_fn(config, specs, data_dir, taxonomy, image_dtype)

        def fn(ctx):
            batch = next(iter(real(ctx)))
            return tf.data.Dataset.from_tensors(batch).repeat()

        return fn

    return make
