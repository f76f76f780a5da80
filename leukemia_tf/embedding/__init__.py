"""Embed once, probe many: a feature store of a frozen backbone, and heads fitted on it.

* :mod:`~leukemia_tf.embedding.store`: the store's files (numpy shards and
  ``embedding.json``);
* :mod:`~leukemia_tf.embedding.embed_lib`: runs a backbone once over every
  split of the data sets (``python -m leukemia_tf.embed``);
* :mod:`~leukemia_tf.embedding.probe_lib`: fits a linear, MLP or k-NN head on
  the stored features and writes an ordinary run directory
  (``python -m leukemia_tf.train --from_embeddings=DIR``).
"""
