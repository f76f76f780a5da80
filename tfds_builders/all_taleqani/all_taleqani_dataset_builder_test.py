"""Tests of the all_taleqani builder on its dummy data."""

from tensorflow_datasets import testing

from tfds_builders.all_taleqani import all_taleqani_dataset_builder


class AllTaleqaniTest(testing.DatasetBuilderTestCase):
    DATASET_CLASS = all_taleqani_dataset_builder.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["original"]
    SPLITS = {"train": 12, "validation": 4, "test": 4}


if __name__ == "__main__":
    testing.test_main()
