"""TFDS builders of the leukemia image sets.

Importing this package registers every builder with TFDS, so that
``tfds.load("pbc", data_dir=...)`` finds them.
"""

import importlib

BUILDERS = (
    "all_taleqani",
    "pbc",
    "aml_cytomorphology_lmu",
    "c_nmc_2019",
    "all_idb",
    "leukemia_folder",
    "leukemia_synthetic",
)


def register_all() -> None:
    """Imports every builder module that exists (registering it with TFDS)."""
    for name in BUILDERS:
        try:
            importlib.import_module(f"tfds_builders.{name}.{name}_dataset_builder")
        except ModuleNotFoundError as e:
            if e.name != f"tfds_builders.{name}" and not (e.name or "").startswith(
                f"tfds_builders.{name}."
            ):
                raise


register_all()
