"""Tests of the label taxonomy (leukemia_tf.taxonomy)."""

import numpy as np
import pytest

from leukemia_tf.taxonomy import NOT_APPLICABLE, Taxonomy, TaxonomyError


@pytest.fixture(scope="module")
def tax():
    return Taxonomy.load()


def test_bundled_tree_shape(tax):
    assert tax.levels[0] == ("normal", "reactive", "leukemia")
    assert tax.levels[1] == ("acute", "chronic")
    assert tax.levels[2] == ("ALL", "AML", "APL", "CLL", "CML")
    assert tax.levels[3] == ("early_pre_b", "pre_b", "pro_b")
    assert tax.num_levels == 4
    assert tax.leaves == (
        "normal",
        "reactive",
        "early_pre_b",
        "pre_b",
        "pro_b",
        "AML",
        "APL",
        "CLL",
        "CML",
    )


def test_paths_and_encoding(tax):
    assert tax.path("pre_b") == ("leukemia", "acute", "ALL", "pre_b")
    np.testing.assert_array_equal(tax.encode("pre_b"), [2, 0, 0, 1])
    np.testing.assert_array_equal(tax.encode("CML"), [2, 1, 4, NOT_APPLICABLE])
    np.testing.assert_array_equal(tax.encode("normal"), [0, -1, -1, -1])
    # A label that stops above the leaves.
    np.testing.assert_array_equal(tax.encode("ALL"), [2, 0, 0, -1])
    for node in tax.nodes:
        assert tax.decode(tax.encode(node)) == node


def test_level_parents(tax):
    np.testing.assert_array_equal(tax.level_parents(0), [0, 0, 0])
    np.testing.assert_array_equal(tax.level_parents(1), [2, 2])  # both under leukemia
    np.testing.assert_array_equal(tax.level_parents(2), [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(tax.level_parents(3), [0, 0, 0])


def test_level_membership_marks_each_class_under_its_nodes(tax):
    # Classes may sit at any depth: a leaf deep down, an inner node, a top-level leaf.
    names = ["pre_b", "AML", "leukemia", "normal"]
    level0, level1, level2, level3 = tax.level_membership(names)
    assert level0.shape == (4, 3) and level3.shape == (4, 3)
    np.testing.assert_array_equal(level0, [[0, 0, 1], [0, 0, 1], [0, 0, 1], [1, 0, 0]])
    np.testing.assert_array_equal(level1, [[1, 0], [1, 0], [0, 0], [0, 0]])
    np.testing.assert_array_equal(level2[:, tax.level_index("ALL")], [1, 0, 0, 0])
    np.testing.assert_array_equal(level2[:, tax.level_index("AML")], [0, 1, 0, 0])
    np.testing.assert_array_equal(level3, [[0, 1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]])


def test_leaf_paths_and_leaves_under(tax):
    m = tax.leaf_paths_matrix()
    assert m.shape == (len(tax.leaves), tax.num_levels)
    assert tax.leaves_under("acute") == ("early_pre_b", "pre_b", "pro_b", "AML", "APL")
    assert tax.leaf_index("CLL") == 7
    with pytest.raises(TaxonomyError, match="not a leaf"):
        tax.leaf_index("ALL")


def test_dataset_mappings(tax):
    assert tax.map_labels("all_taleqani", ["Benign", "Pro"]) == ["reactive", "pro_b"]
    assert tax.map_labels("aml_cytomorphology_lmu", ["KSC", "MYO"]) == [None, "AML"]
    with pytest.raises(TaxonomyError, match=r"\['XYZ'\] are not mapped"):
        tax.map_labels("pbc", ["neutrophil", "XYZ"])
    with pytest.raises(TaxonomyError, match="no label mapping for dataset 'nope'"):
        tax.dataset_mapping("nope")


@pytest.mark.parametrize(
    "text, message",
    [
        ("tree:\n  a: {}\n  b:\n    a: {}\n", "duplicate node name 'a'"),
        ("tree:\n  a:\n    b:\n      a: {}\n", "cycle"),
        ("tree:\n  a: {}\ndatasets:\n  s:\n    x: zz\n", "unknown node 'zz'"),
        ("tree: []\n", "non-empty mapping"),
        ("tree:\n  a: {}\nextra: 1\n", "unknown top-level keys"),
        ("tree: [unclosed\n", "not valid YAML"),
        ("datasets: {}\n", "with a 'tree' key"),
    ],
)
def test_invalid_files(tmp_path, text, message):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(TaxonomyError, match=message):
        Taxonomy.load(path)


def test_unknown_node_lists_known(tax):
    with pytest.raises(TaxonomyError, match="known nodes: normal, reactive"):
        tax.path("leukaemia")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        Taxonomy.load(tmp_path / "nope.yaml")
