r"""Embeds data sets with a frozen backbone: ``python -m leukemia_tf.embed``.

Runs the backbone once (inference, no augmentation) over every split of the
data sets and writes a feature store: the pooled features of every image as
numpy shards, the backbone's weights, and ``embedding.json`` (see
:mod:`leukemia_tf.embedding.store`). ``python -m leukemia_tf.train
--from_embeddings=DIR`` then fits a head on the stored features in seconds and
writes an ordinary run directory.

Example::

  python -m leukemia_tf.embed --backbone=dinov2_small --weights=none \
      --datasets=pbc --data_dir=~/tensorflow_datasets --output=stores/pbc_dinov2_small
  python -m leukemia_tf.train --from_embeddings=stores/pbc_dinov2_small --probe=linear \
      --model_dir=runs/pbc_linear
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from leukemia_tf import cli

_BACKBONE = flags.DEFINE_string("backbone", None, "Backbone name (leukemia_tf.models registry).")
_WEIGHTS = flags.DEFINE_string(
    "weights",
    "none",
    "'none' (random init, seeded by --seed), 'imagenet', or a PATH to a weights file for the "
    "backbone (DINOv2 / DinoBloom: also a preset directory).",
)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 0, "Square input size in pixels; 0: the backbone's default.", lower_bound=0
)
_DATASETS = flags.DEFINE_string(
    "datasets", "leukemia_synthetic", "Comma-separated TFDS data sets (mixture weights ignored)."
)
_LABEL_MODE = flags.DEFINE_enum(
    "label_mode", "native", ["native", "taxonomy"], "Labels as in leukemia_tf.train."
)
_TAXONOMY = flags.DEFINE_string("taxonomy", "", "Taxonomy YAML; empty: the bundled one.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data directory; empty: TFDS's default.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Inference batch size.", lower_bound=1)
_SPLITS = flags.DEFINE_string(
    "splits", "", "Comma-separated splits; empty: every split all the data sets have."
)
_MAX_EXAMPLES = flags.DEFINE_integer(
    "max_examples_per_split",
    0,
    "Keep only the first N examples (in pipeline order) of each split: smoke runs; 0: all.",
    lower_bound=0,
)
_ERASE_MARKS = flags.DEFINE_bool(
    "erase_marks", False, "Erase burned-in marks before the backbone, as in leukemia_tf.train."
)
_WHITE_BALANCE = flags.DEFINE_bool(
    "white_balance", False, "Neutral white before the backbone, as in leukemia_tf.train."
)
_STAIN_NORM = flags.DEFINE_bool(
    "stain_norm", False, "Stain scaled to a reference strength, as in leukemia_tf.train."
)
_CELL_CROP = flags.DEFINE_bool(
    "cell_crop", False, "Crop each image around its nucleus, as in leukemia_tf.train."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of a randomly initialised backbone.")
_OUTPUT = flags.DEFINE_string("output", None, "The feature store's directory (local).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing store at --output.")


def main(argv: Sequence[str]) -> None:
    cli.check_no_args(argv)
    from leukemia_tf.embedding import embed_lib  # heavy imports after flag parsing

    config = embed_lib.EmbedConfig(
        backbone=_BACKBONE.value,
        output=_OUTPUT.value,
        weights=_WEIGHTS.value,
        image_size=_IMAGE_SIZE.value,
        datasets=_DATASETS.value,
        label_mode=_LABEL_MODE.value,
        taxonomy=_TAXONOMY.value,
        data_dir=_DATA_DIR.value,
        batch_size=_BATCH_SIZE.value,
        splits=_SPLITS.value,
        max_examples_per_split=_MAX_EXAMPLES.value,
        erase_marks=_ERASE_MARKS.value,
        white_balance=_WHITE_BALANCE.value,
        stain_norm=_STAIN_NORM.value,
        cell_crop=_CELL_CROP.value,
        seed=_SEED.value,
        overwrite=_OVERWRITE.value,
    )
    try:
        meta = embed_lib.embed(config)
    except (FileNotFoundError, ValueError) as e:
        raise cli.UserError(str(e)) from e
    backbone = meta["backbone"]
    print(
        f"\nEmbedded {meta['images']} images of {meta['datasets']} with {backbone['name']} "
        f"({backbone['weights']}, {backbone['image_size']} px, {backbone['feature_dim']} "
        f"features) in {meta['embed_seconds']:.1f} s ({meta['images_per_second']:.1f} images/s)\n"
        f"Store: {config.output}\n"
        "Next:\n"
        f"  python -m leukemia_tf.train --from_embeddings={config.output} --probe=linear "
        "--model_dir=RUN_DIR"
    )


if __name__ == "__main__":
    flags.mark_flag_as_required("backbone")
    flags.mark_flag_as_required("output")
    cli.run(main)
