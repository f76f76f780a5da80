"""Burned-in marks: detection, EraseMarks, the mark augmenter, heat on marks."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from leukemia_tf.data import marks
from leukemia_tf.evaluation import explain, report, sections
from leukemia_tf.models import classifier
from leukemia_tf.models.mark_augment import EraseMarks, RandomMarks, build_mark_augmenter

SIZE = 128
DATA_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
BACKGROUND = np.array([236.0, 232.0, 240.0], np.float32)


def cell_image(seed=0, size=SIZE) -> np.ndarray:
    """A plain synthetic smear: pale background, pink red cells, purple nuclei, soft edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = BACKGROUND + rng.normal(0, 4, (size, size, 3))
    for _ in range(8):  # red cells: pink disks with a paler centre
        cy, cx = rng.uniform(0, size, 2)
        d = np.hypot(yy - cy, xx - cx)
        weight = np.clip((0.12 * size - d) / 2.0, 0, 1)[..., None]
        img = img * (1 - weight) + np.array([215.0, 160.0, 185.0]) * weight
    for _ in range(2):  # white cells: purple disks
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        d = np.hypot(yy - cy, xx - cx)
        weight = np.clip((0.15 * size - d) / 2.0, 0, 1)[..., None]
        nucleus = np.array([110.0, 55.0, 160.0]) + rng.normal(0, 8, (size, size, 3))
        img = img * (1 - weight) + nucleus * weight
    return np.clip(img, 0, 255).astype(np.float32)


def draw_label(img: np.ndarray, top: int, left: int, style: str = "box") -> np.ndarray:
    """Draws a scale-bar label: ``box`` (white box, black text), ``red`` (red text and bar)."""
    img = img.copy()
    h, w = 10, 36
    ink = np.array([0.0, 0.0, 0.0]) if style == "box" else np.array([220.0, 30.0, 30.0])
    if style == "box":
        img[top : top + h, left : left + w] = 255.0
    for x in range(left + 4, left + w - 4, 3):  # letters: 1-px vertical strokes
        if (x - left) % 12 < 9:
            img[top + 2 : top + 6, x] = ink
    img[top + 7, left + 3 : left + w - 3] = ink  # the bar
    return img


def mark_box(top, left, h=10, w=36, size=SIZE) -> np.ndarray:
    out = np.zeros((size, size), bool)
    out[top : top + h, left : left + w] = True
    return out


# ---------------------------------------------------------------- detection
def test_no_mark_on_plain_cells():
    images = np.stack([cell_image(seed) for seed in range(4)])
    mask = marks.detect_marks(tf.constant(images)).numpy()
    assert mask.shape == (4, SIZE, SIZE, 1)
    assert mask.max() == 0.0


@pytest.mark.parametrize("style", ["box", "red"])
def test_finds_a_drawn_label_in_the_corner(style):
    top, left = SIZE - 14, SIZE - 42
    img = draw_label(cell_image(1), top, left, style)
    mask = marks.detect_marks(tf.constant(img[None])).numpy()[0, ..., 0] > 0
    truth = mark_box(top, left)
    # Most of the label's ink is found, and nothing far from it.
    strokes = np.abs(img - cell_image(1)).max(-1) > 100
    assert mask[strokes & truth].mean() > 0.8
    near = np.zeros_like(truth)
    near[top - 4 :, left - 4 :] = True
    assert mask.any() and not (mask & ~near).any()


def test_marks_are_sought_in_the_border_band_only():
    # A short drawn stroke group: found at the border, ignored in the middle.
    def short_text(img, top, left):
        img = img.copy()
        for x in range(left, left + 10, 3):
            img[top : top + 4, x] = 0.0
        return img

    plain = cell_image(2)
    at_border = short_text(plain, SIZE - 8, SIZE - 14)
    inside = short_text(plain, SIZE // 2, SIZE // 2)
    found = marks.has_mark(marks.detect_marks(tf.constant(np.stack([at_border, inside]))))
    assert found.numpy().tolist() == [True, False]


# ---------------------------------------------------------------- EraseMarks
def test_erase_is_the_identity_without_marks():
    images = np.stack([cell_image(seed) for seed in range(3)])
    out = EraseMarks()(tf.constant(images)).numpy()
    np.testing.assert_array_equal(out, images)


def test_erase_removes_a_drawn_label():
    plain = cell_image(3)
    top, left = SIZE - 14, SIZE - 42
    marked = draw_label(plain, top, left, "box")
    both = np.stack([marked, plain])
    out = EraseMarks()(tf.constant(both)).numpy()
    np.testing.assert_array_equal(out[1], plain)  # the unmarked image of the batch
    region = mark_box(top, left)
    # The box and its text are gone: the region is close to the background.
    before = np.abs(marked[region] - BACKGROUND).max(-1)
    after = np.abs(out[0][region] - BACKGROUND).max(-1)
    assert before.max() > 200 and after.mean() < 25 and after.max() < 80
    assert not marks.has_mark(marks.detect_marks(tf.constant(out[:1]))).numpy()[0]


def test_classifier_with_erase_marks_saves_and_loads(tmp_path):
    model = classifier.build_classifier(
        backbone="cnn_tiny", head="flat", num_classes=3, image_size=32, erase_marks=True
    )
    assert isinstance(classifier.get_erase_marks(model), EraseMarks)
    assert classifier.get_backbone(model) is not None
    plain = classifier.build_classifier(
        backbone="cnn_tiny", head="flat", num_classes=3, image_size=32
    )
    assert classifier.get_erase_marks(plain) is None
    images = np.stack([cell_image(s, 32) for s in range(2)])
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(classifier.get_erase_marks(loaded), EraseMarks)
    np.testing.assert_allclose(
        loaded(images)["logits"].numpy(), model(images)["logits"].numpy(), atol=1e-5
    )
    # And as a SavedModel: the erasing ops export and run.
    export = tmp_path / "saved"
    fn = tf.function(
        lambda x: model(x)["logits"], input_signature=[tf.TensorSpec([None, 32, 32, 3])]
    )
    tf.saved_model.save(model, str(export), signatures={"serving_default": fn})
    served = tf.saved_model.load(str(export)).signatures["serving_default"]
    result = list(served(tf.constant(images)).values())[0].numpy()
    np.testing.assert_allclose(result, model(images)["logits"].numpy(), atol=1e-5)


def test_export_of_a_model_trained_with_erase_marks(tmp_path, train_tiny_model):
    """One tiny run through every new training option: marks erased in the model and drawn by
    the augmenter, and every acquisition shift; then the export serves what Keras computes."""
    from leukemia_tf import rundir
    from leukemia_tf.serving import export_lib

    model_dir = train_tiny_model(
        tmp_path / "run", erase_marks=True, augment_marks=True, acquisition_shifts="all"
    )
    config = rundir.read_config(model_dir)
    assert config.augment_marks and config.erase_marks and config.acquisition_shifts == "all"
    result = export_lib.export_model(model_dir, tmp_path / "export")
    assert result.version == 1 and result.max_abs_difference < 1e-4


# ---------------------------------------------------------------- RandomMarks
def test_mark_augmenter_is_identity_when_not_training():
    images = tf.constant(np.stack([cell_image(s) for s in range(4)]))
    layer = build_mark_augmenter(SIZE, seed=1)
    np.testing.assert_array_equal(layer(images, training=False).numpy(), images.numpy())
    np.testing.assert_array_equal(layer(images).numpy(), images.numpy())
    off = RandomMarks(probability=0.0, seed=1)
    np.testing.assert_array_equal(off(images, training=True).numpy(), images.numpy())


def test_mark_augmenter_draws_marks_in_corners():
    images = tf.constant(np.stack([cell_image(s % 4) for s in range(32)]))
    layer = RandomMarks(probability=0.5, seed=3)
    out = layer(images, training=True).numpy()
    changed = np.abs(out - images.numpy()).max(-1) > 30  # [B, H, W]
    marked = changed.any(axis=(1, 2))
    assert 6 <= marked.sum() <= 26  # about half
    # Only near a corner: nothing changes in the central third.
    third = SIZE // 3
    assert not changed[:, third : 2 * third, third : 2 * third].any()
    # The detector finds most of the drawn marks (they are what it is made for).
    found = marks.has_mark(marks.detect_marks(tf.constant(out))).numpy()
    assert found[marked].mean() > 0.7
    assert out.min() >= 0.0 and out.max() <= 255.0
    # Draws differ between calls (a seeded stream, not a fixed pattern).
    again = layer(images, training=True).numpy()
    assert not np.array_equal(out, again)


def test_mark_augmenter_serializes():
    layer = RandomMarks(probability=0.3, seed=5)
    clone = RandomMarks.from_config(layer.get_config())
    assert clone.probability == 0.3 and clone.seed == 5
    with pytest.raises(ValueError):
        RandomMarks(probability=1.5)


# ---------------------------------------------------------------- heat on marks
def test_heat_fractions_on_a_hand_made_map():
    heat = np.zeros((2, 10, 10))
    heat[0, 9, 9] = 3.0  # corner: on the mark and the border
    heat[0, 5, 5] = 1.0  # centre
    heat[1, 4:6, 4:6] = -1.0  # negative heat counts as none
    masks = np.zeros((2, 10, 10), bool)
    masks[0, 8:, 8:] = True
    out = marks.heat_fractions(heat, masks, border_fraction=0.1)
    np.testing.assert_allclose(out["on_marks"], [0.75, 0.0])
    np.testing.assert_allclose(out["on_border"], [0.75, 0.0])
    np.testing.assert_allclose(out["mark_area"], [0.04, 0.0])
    band = marks.border_band(10, 10, 0.1)
    assert band.sum() == 100 - 64


def test_heat_section_and_report_flag_a_shortcut():
    img = draw_label(cell_image(4), SIZE - 14, SIZE - 42, "box")
    heat = np.zeros((1, SIZE, SIZE))
    heat[0, SIZE - 13 : SIZE - 5, SIZE - 40 : SIZE - 8] = 1.0  # all heat on the label
    fractions = explain.heat_on_marks(img[None], heat)
    assert fractions["has_mark"][0] and fractions["on_marks"][0] > 0.9
    assert fractions["on_border"][0] == pytest.approx(1.0)
    section = sections.heat_section(
        {"Pro": {k: list(v) for k, v in fractions.items()}}, ["Benign", "Pro"]
    )
    assert section["shortcut_classes"] == ["Pro"]
    assert section["per_class"][0]["n_with_mark"] == 1
    caveat = report.heat_on_marks_caveat(section["per_class"][0])
    assert "Pro" in caveat and "shortcut" in caveat


def test_marks_section_counts_accuracy_with_and_without_marks():
    sampler = explain.ExampleSampler(2, per_cell=0)
    plain = cell_image(5)
    marked = draw_label(plain, SIZE - 14, SIZE - 42, "box")
    images = np.stack([marked, marked, plain, plain])
    sampler.offer(images, np.array([0, 0, 0, 1]), np.array([0, 1, 0, 1]), None, None)
    section = sections.marks_section(sampler.mark_counts, ["a", "b"])
    a, b = section["per_class"]
    assert (a["n"], a["n_with_mark"], a["accuracy_with_mark"], a["accuracy_without_mark"]) == (
        3,
        2,
        0.5,
        1.0,
    )
    assert b["n_with_mark"] == 0 and b["accuracy_with_mark"] is None
    assert section["all"]["n"] == 4
    lines = report._marks_lines({"marks": section})
    assert any("With mark" in line for line in lines)


# ---------------------------------------------------------------- real images
def test_real_taleqani_scale_bars_found_and_erased():
    root = DATA_DIR / "all_taleqani" / "Original"
    if not root.is_dir():
        pytest.skip(f"real images not found at {root} (see ../shared/data/README.md)")
    files = [sorted((root / c).glob("*.jpg"))[::97][:2] for c in ("Benign", "Early", "Pre", "Pro")]
    files = [f for group in files for f in group]
    if len(files) < 4:
        pytest.skip(f"too few images under {root}")
    assert all(marks.count_marks(files))
    images = np.stack([marks._read_rgb(str(f)) for f in files]).astype(np.float32)
    mask = marks.detect_marks(tf.constant(images)).numpy()[..., 0] > 0
    # The marks sit in the bottom-right corner and cover little of the image.
    corner = np.zeros(mask.shape[1:], bool)
    corner[-45:, -110:] = True
    assert not (mask & ~corner).any()
    assert mask.mean() < 0.02
    erased = EraseMarks()(tf.constant(images)).numpy()
    assert not marks.has_mark(marks.detect_marks(tf.constant(erased))).numpy().any()
    np.testing.assert_array_equal(erased[:, :100, :100], images[:, :100, :100])
