"""Tests of the grouped, stratified, deterministic splits."""

from collections import Counter

import pytest

from leukemia_tf.data.splits import check_no_group_leak, grouped_stratified_split


def _make(n_groups=40, per_group=5, classes=("a", "b", "c")):
    keys, labels, groups = [], [], []
    for g in range(n_groups):
        label = classes[g % len(classes)]
        for i in range(per_group + g % 3):
            keys.append(f"g{g}/img{i}.jpg")
            labels.append(label)
            groups.append(f"patient{g}")
    return keys, labels, groups


def test_groups_never_cross_splits():
    keys, labels, groups = _make()
    split = grouped_stratified_split(keys, labels, groups, seed=3)
    check_no_group_leak(split, dict(zip(keys, groups, strict=True)))
    per_group = {}
    for k, g in zip(keys, groups, strict=True):
        per_group.setdefault(g, set()).add(split[k])
    assert all(len(s) == 1 for s in per_group.values())


def test_stratified_and_proportions():
    keys, labels, _ = _make(n_groups=60)
    split = grouped_stratified_split(keys, labels, None, seed=0)
    counts = Counter(split.values())
    n = len(keys)
    assert abs(counts["train"] / n - 0.7) < 0.03
    assert abs(counts["validation"] / n - 0.15) < 0.03
    for cls in "abc":
        cls_keys = [k for k, lab in zip(keys, labels, strict=True) if lab == cls]
        frac = sum(split[k] == "train" for k in cls_keys) / len(cls_keys)
        assert abs(frac - 0.7) < 0.05, cls


def test_deterministic_and_order_independent():
    keys, labels, groups = _make()
    a = grouped_stratified_split(keys, labels, groups, seed=1)
    rev = grouped_stratified_split(keys[::-1], labels[::-1], groups[::-1], seed=1)
    assert a == rev
    b = grouped_stratified_split(keys, labels, groups, seed=2)
    assert a != b


def test_every_split_gets_each_class_with_few_groups():
    keys, labels, groups = _make(n_groups=12, per_group=3)
    split = grouped_stratified_split(keys, labels, groups, seed=0)
    for cls in "abc":
        present = {split[k] for k, lab in zip(keys, labels, strict=True) if lab == cls}
        assert present == {"train", "validation", "test"}, cls


def test_errors():
    with pytest.raises(ValueError, match="unique"):
        grouped_stratified_split(["a", "a"], [0, 1])
    with pytest.raises(ValueError, match="same length"):
        grouped_stratified_split(["a"], [0, 1])
    with pytest.raises(ValueError, match="invalid split fractions"):
        grouped_stratified_split(["a"], [0], fractions={"train": -1})
    with pytest.raises(ValueError, match="appears in splits"):
        check_no_group_leak({"x": "train", "y": "test"}, {"x": "p1", "y": "p1"})
