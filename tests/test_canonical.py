"""Canonical framing and white balance: CellCrop, WhiteBalance, explanations on the input frame."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from leukemia_tf.evaluation import explain
from leukemia_tf.models import canonical, classifier
from leukemia_tf.models.label_space import LabelSpace

SIZE = 96
GLASS = np.array([236.0, 226.0, 214.0], np.float32)  # a warm, PBC-like background
RED_CELL = np.array([215.0, 160.0, 170.0], np.float32)
NUCLEUS = np.array([95.0, 50.0, 150.0], np.float32)


def disc(size, cy, cx, radius):
    yy, xx = np.mgrid[:size, :size] + 0.5
    return np.clip(radius - np.hypot(yy - cy, xx - cx) + 0.5, 0.0, 1.0)[..., None]


def smear(cy=48.0, cx=48.0, radius=10.0, size=SIZE, seed=0, red_cells=6) -> np.ndarray:
    """Glass, pink red cells away from the centre, one purple nucleus at (cy, cx)."""
    rng = np.random.default_rng(seed)
    img = np.broadcast_to(GLASS, (size, size, 3)).copy() + rng.normal(0, 2, (size, size, 3))
    for _ in range(red_cells):
        y, x = rng.uniform(0, size, 2)
        if np.hypot(y - cy, x - cx) < radius + 0.12 * size:
            continue
        w = disc(size, y, x, 0.1 * size)
        img = img * (1 - w) + RED_CELL * w
    w = disc(size, cy, cx, radius)
    img = img * (1 - w) + NUCLEUS * w
    return np.clip(img, 0, 255).astype(np.float32)


def test_crop_box_is_centred_on_the_nucleus_and_scaled_by_its_size():
    images = np.stack([smear(40, 56, 8), smear(50, 44, 14, seed=1)])
    boxes = canonical.boxes_numpy(images)
    for (cy, cx, radius), (top, left, side) in zip([(40, 56, 8), (50, 44, 14)], boxes, strict=True):
        # a uniform disc of radius R has sqrt(2 E[r^2]) = R: side = 2 * margin * R
        assert side == pytest.approx(2 * 2.0 * radius / SIZE, rel=0.1)
        assert top + side / 2 == pytest.approx(cy / SIZE, abs=0.02)
        assert left + side / 2 == pytest.approx(cx / SIZE, abs=0.02)
    # a larger nucleus gets a larger box: same framing of the cell
    assert boxes[1, 2] > boxes[0, 2]


def test_framing_does_not_depend_on_magnification():
    """The same cell at three magnifications comes out at the same scale.

    The smallest is cropped, the largest (a nucleus that fills the frame) is
    zoomed out onto its glass colour.
    """
    cells = [smear(48, 48, radius, red_cells=0) for radius in (8, 16, 30)]
    sides = canonical.boxes_numpy(np.stack(cells))[:, 2]
    assert sides[0] < 1.0 < sides[2]
    out = canonical.CellCrop()(np.stack(cells)).numpy()
    purple = (out[..., 0] < 160).mean(axis=(1, 2))  # nucleus share of the framing
    np.testing.assert_allclose(purple, purple[0], atol=0.03)
    assert 0.1 < purple[0] < 0.4
    # the zoomed-out margin is the image's own glass
    np.testing.assert_allclose(out[2, :3, :3].reshape(-1, 3).mean(0), GLASS, atol=6.0)


def test_framing_does_not_depend_on_lamp_or_white_balance():
    image = smear(44, 52, 10)
    dimmer = np.clip(image * np.array([0.8, 0.9, 1.0], np.float32), 0, 255)
    boxes = canonical.boxes_numpy(np.stack([image, dimmer]))
    np.testing.assert_allclose(boxes[0], boxes[1], atol=0.01)


def test_an_image_without_a_nucleus_keeps_its_frame():
    blank = np.broadcast_to(GLASS, (SIZE, SIZE, 3)).astype(np.float32).copy()
    blank += np.random.default_rng(0).normal(0, 2, blank.shape).astype(np.float32)
    boxes = canonical.boxes_numpy(blank[None])
    np.testing.assert_allclose(boxes, [[0, 0, 1]], atol=1e-6)
    out = canonical.CellCrop()(blank[None]).numpy()
    np.testing.assert_allclose(out[0], blank, atol=1e-3)


def test_a_crop_stays_inside_the_image_and_a_zoom_out_contains_it():
    near_corner = smear(12, 84, 9, red_cells=0)  # cropped: the box stays inside
    large = smear(30, 60, 30, red_cells=0)  # zoomed out: the box holds the whole image
    boxes = canonical.boxes_numpy(np.stack([near_corner, large]), prior_sigma=10.0)
    top, left, side = boxes[0]
    assert side < 1.0
    assert 0.0 <= top and top + side <= 1.0 + 1e-6
    assert 0.0 <= left and left + side <= 1.0 + 1e-6
    top, left, side = boxes[1]
    assert side > 1.0
    assert top <= 0.0 and top + side >= 1.0 - 1e-6
    assert left <= 0.0 and left + side >= 1.0 - 1e-6


def test_white_balance_makes_the_glass_white_and_keeps_a_white_image():
    image = smear(48, 48, 10)
    balanced = canonical.white_balance(image[None]).numpy()[0]
    glass = balanced[:8, :8].reshape(-1, 3).mean(axis=0)  # a corner of bare glass
    # the 98th percentile is the white: the noisy glass averages a little under it, neutral
    np.testing.assert_allclose(glass, 255.0, atol=8.0)
    assert np.ptp(glass) < 2.0
    # colours are read against the white: the nucleus keeps its hue, only brighter
    assert balanced[48, 48, 2] > balanced[48, 48, 0] > balanced[48, 48, 1]
    white = image.copy()
    white[:20] = 255.0  # the brightest 2 % are already 255 in every channel
    np.testing.assert_allclose(canonical.white_balance(white[None]).numpy()[0], white, atol=1e-3)


def test_classifier_input_layers_order_and_reload(tmp_path):
    model = classifier.build_classifier(
        backbone="cnn_tiny",
        head="flat",
        num_classes=3,
        image_size=48,
        erase_marks=True,
        white_balance=True,
        stain_norm=True,
        cell_crop=True,
    )
    names = [layer.name for layer in classifier.input_layers(model)]
    assert names == ["erase_marks", "white_balance", "stain_norm", "cell_crop"]
    plain = classifier.build_classifier(
        backbone="cnn_tiny", head="flat", num_classes=3, image_size=48
    )
    assert classifier.input_layers(plain) == []
    x = np.stack([smear(20, 28, 5, size=48), smear(24, 24, 8, size=48, seed=2)])
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded(x)["logits"], model(x)["logits"], atol=1e-5)
    # the crop is part of the model: shifting the cell in the frame barely moves the output
    # the crop follows the cell: a cell moved in the frame gives (almost) the same crop
    still = smear(20, 28, 5, size=48, red_cells=0)[None]
    moved = smear(28, 20, 5, size=48, red_cells=0)[None]
    crop = model.get_layer("cell_crop")
    assert np.abs(still - moved).max() > 100
    np.testing.assert_allclose(
        canonical.boxes_numpy(moved)[0, [1, 0]], canonical.boxes_numpy(still)[0, :2], atol=0.01
    )
    assert np.abs(crop(still).numpy() - crop(moved).numpy()).mean() < 4.0


def test_explanations_of_a_cropping_model_are_on_the_input_frame():
    model = classifier.build_classifier(
        backbone="cnn_tiny", head="flat", num_classes=3, image_size=48, cell_crop=True
    )
    images = np.stack([smear(16, 30, 4, size=48, red_cells=0)])
    gradcam = explain.make_explainer(model, LabelSpace(["a", "b", "c"], "flat", None))
    assert gradcam(images, np.array([1])).shape == (1, 48, 48)
    top, left, side = canonical.boxes_numpy(images)[0]
    assert side < 0.6
    inside = np.zeros((48, 48), bool)
    y0, x0, n = round(top * 48), round(left * 48), round(side * 48)
    inside[y0 : y0 + n, x0 : x0 + n] = True
    # what the explainer does with a map of the backbone's (cropped) frame
    drawn = explain._to_input_frame(
        np.ones((1, 48, 48), np.float32), images, classifier.input_layers(model)
    )
    assert drawn[0][~inside].max() == 0.0
    assert drawn[0][inside].min() > 0.99


def test_uncrop_puts_the_map_back_on_the_image_frame():
    maps = np.ones((2, 10, 10), np.float32)
    out = canonical.uncrop(maps, np.array([[0.2, 0.5, 0.5], [-0.5, -0.5, 2.0]]))
    # a crop: the map covers its box, 0 elsewhere
    assert out[0, 2:7, 5:10].min() == pytest.approx(1.0)
    assert out[0].sum() == pytest.approx(25.0, abs=1.0)
    # a zoom out: the image was the middle of the map, which now covers all of it
    np.testing.assert_allclose(out[1], 1.0, atol=1e-5)
    ramp = np.tile(np.arange(10, dtype=np.float32), (10, 1))[None]
    back = canonical.uncrop(ramp, np.array([[-0.5, -0.5, 2.0]]))[0]
    assert back[0, 0] == pytest.approx(2.5, abs=0.3) and back[0, -1] == pytest.approx(6.5, abs=0.3)


def paler(image: np.ndarray, factor: float) -> np.ndarray:
    """The same smear with every dye's optical density (against its glass) times ``factor``."""
    od = -np.log((image + 1.0) / (GLASS + 1.0))
    return np.clip((GLASS + 1.0) * np.exp(-factor * np.maximum(od, 0.0)) - 1.0, 0, 255)


def test_stain_norm_makes_a_paler_stain_as_dark_as_the_reference():
    image = smear(48, 48, 12)
    pale = paler(image, 0.4).astype(np.float32)
    peaks = canonical.stain_peak(np.stack([image, pale])).numpy()
    assert peaks[1] == pytest.approx(0.4 * peaks[0], rel=0.1)
    out = canonical.stain_normalize(np.stack([image, pale])).numpy()
    # both reach the reference strength, and then look alike
    np.testing.assert_allclose(
        canonical.stain_peak(out).numpy(), canonical.REFERENCE_PEAK, rtol=0.05
    )
    cell = (slice(40, 56), slice(40, 56))  # inside the nucleus
    before = np.abs(image[cell] - pale[cell]).mean()
    after = np.abs(out[0][cell] - out[1][cell]).mean()
    assert before > 40.0 and after < 0.1 * before
    # the glass keeps its colour; hues are kept (the nucleus stays bluer than it is red)
    np.testing.assert_allclose(out[1, :6, :6].reshape(-1, 3).mean(0), GLASS, atol=4.0)
    assert out[1, 48, 48, 2] > out[1, 48, 48, 0]


def test_stain_norm_at_the_reference_strength_changes_nothing():
    image = smear(48, 48, 12)
    peak = float(canonical.stain_peak(image[None]).numpy()[0])
    at_reference = canonical.stain_normalize(image[None], reference=peak).numpy()[0]
    np.testing.assert_allclose(at_reference, image, atol=1.0)


def test_black_ink_is_not_a_nucleus():
    """A black scale bar absorbs red and blue alike: the box stays on the nucleus."""
    image = smear(30, 60, 8, red_cells=0)
    image[80:88, 6:50] = 10.0  # a black bar in the bottom-left corner
    top, left, side = canonical.boxes_numpy(image[None])[0]
    assert top + side / 2 == pytest.approx(30 / SIZE, abs=0.03)
    assert left + side / 2 == pytest.approx(60 / SIZE, abs=0.03)
    assert side == pytest.approx(4 * 8 / SIZE, rel=0.15)
