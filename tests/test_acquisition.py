"""Acquisition-shift augmentations: identity at magnitude 0, and what each one keeps."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from leukemia_tf.models import acquisition
from leukemia_tf.models.augment import build_augmenter
from leukemia_tf.training import config as config_lib
from tests.test_augment import cell_images, real_images

SIZE = 48


def _images(n=8, seed=0):
    return tf.constant(cell_images(n, SIZE, seed))


def _ones(shape, value=1.0):
    return tf.fill(shape, value)


# ------------------------------------------------------------------ identity


@pytest.mark.parametrize("shift", acquisition.SHIFTS)
def test_every_shift_is_the_exact_identity_at_magnitude_zero(shift):
    images = _images()
    layer = acquisition.AcquisitionShift([shift], magnitude=0.0, seed=1)
    np.testing.assert_array_equal(layer(images, training=True), images)
    layer = acquisition.AcquisitionShift([shift], magnitude=0.8, seed=1)
    np.testing.assert_array_equal(layer(images, training=False), images)
    np.testing.assert_array_equal(layer(images), images)


def test_the_operations_are_the_identity_at_neutral_parameters():
    images = _images(4)
    b = 4
    np.testing.assert_allclose(
        acquisition.stain_jitter(images, _ones([b, 2]), _ones([b, 2], 0.0), _ones([b, 2, 3], 0.0)),
        images,
        atol=0.05,
    )
    np.testing.assert_allclose(
        acquisition.illumination(images, _ones([b, 3]), tf.constant([[0.0, 1.0, 0.0]] * b)),
        images,
        atol=1e-4,
    )
    np.testing.assert_allclose(acquisition.gamma_curve(images, _ones([b])), images, atol=1e-3)
    np.testing.assert_array_equal(acquisition.gaussian_blur(images, _ones([b], 0.0)), images)
    np.testing.assert_array_equal(acquisition.zoom(images, _ones([b]), _ones([b, 2], 0.5)), images)
    np.testing.assert_array_equal(acquisition.add_noise(images, tf.zeros_like(images)), images)
    np.testing.assert_array_equal(
        acquisition.jpeg(images, tf.fill([b], 50), tf.zeros([b], tf.bool)), images
    )


def test_od_round_trip_and_white_is_zero_density():
    values = tf.constant([[[[0.0, 100.0, 255.0]]]])
    od = acquisition.to_od(values)
    assert float(od[0, 0, 0, 2]) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(acquisition.from_od(od), values, atol=1e-3)


# ------------------------------------------------------------ what each keeps


def test_stain_jitter_keeps_white_glass_and_changes_stained_pixels_by_dye():
    images = _images(4).numpy()
    images[:, :4, :4] = 255.0  # a patch of bare glass
    b = 4
    darker = acquisition.stain_jitter(
        tf.constant(images),
        tf.constant([[1.5, 1.0]] * b),
        tf.constant([[0.1, 0.0]] * b),
        tf.zeros([b, 2, 3]),
    ).numpy()
    np.testing.assert_allclose(darker[:, :4, :4], 255.0, atol=0.01)
    # More of the nuclear dye: stained pixels absorb more, glass does not.
    od_before = acquisition.to_od(images).numpy().sum(-1)
    od_after = acquisition.to_od(darker).numpy().sum(-1)
    stained = od_before > 0.8
    assert (od_after[stained] > od_before[stained]).mean() > 0.95
    # The added density is along the nuclear dye's colour vector.
    delta = (acquisition.to_od(darker) - acquisition.to_od(images)).numpy()[stained]
    direction = delta.mean(0) / np.linalg.norm(delta.mean(0))
    nuclear = acquisition.ROMANOWSKY_OD[0] / np.linalg.norm(acquisition.ROMANOWSKY_OD[0])
    assert float(direction @ nuclear) > 0.95


def test_illumination_scales_channels_and_a_ramp_keeps_the_mean():
    images = tf.fill([2, SIZE, SIZE, 3], 100.0)
    out = acquisition.illumination(
        images, tf.constant([[1.2, 1.0, 0.8]] * 2), tf.constant([[0.0, 1.0, 0.0]] * 2)
    ).numpy()
    np.testing.assert_allclose(out[..., 0], 120.0, rtol=1e-5)
    np.testing.assert_allclose(out[..., 2], 80.0, rtol=1e-5)
    ramp = acquisition.illumination(
        images, tf.ones([2, 3]), tf.constant([[0.3, 1.0, 0.0], [0.3, 0.6, 0.8]])
    ).numpy()
    np.testing.assert_allclose(ramp.mean(axis=(1, 2, 3)), 100.0, rtol=1e-4)
    assert ramp[0, 0, -1, 0] > ramp[0, 0, 0, 0]  # brighter along +x


def test_gamma_keeps_black_white_and_the_order_of_pixels():
    images = _images(2)
    out = acquisition.gamma_curve(
        tf.concat([images, tf.constant([[[[0.0, 255.0, 0.0]]]]) + tf.zeros_like(images[:1])], 0),
        tf.constant([0.7, 1.4, 0.7]),
    ).numpy()
    np.testing.assert_allclose(out[2, 0, 0], [0.0, 255.0, 0.0], atol=1e-3)
    flat_in = images.numpy()[0].ravel()
    flat_out = out[0].ravel()
    order = np.argsort(flat_in, kind="stable")
    assert np.all(np.diff(flat_out[order]) >= -1e-3)
    assert out[0].mean() > images.numpy()[0].mean()  # gamma < 1 brightens
    assert out[1].mean() < images.numpy()[1].mean()


def test_blur_keeps_the_mean_and_constants_and_lowers_the_detail():
    images = tf.repeat(_images(1), 4, axis=0)
    out = acquisition.gaussian_blur(images, tf.constant([0.5, 1.0, 2.0, 3.0])).numpy()
    np.testing.assert_allclose(out.mean(axis=(1, 2)), images.numpy().mean(axis=(1, 2)), rtol=0.01)
    detail = np.abs(np.diff(out, axis=2)).mean(axis=(1, 2, 3))
    assert np.all(np.diff(detail) < 0)  # wider blur, less detail
    assert detail[0] < np.abs(np.diff(images.numpy(), axis=2)).mean()
    constant = tf.fill([1, SIZE, SIZE, 3], 77.0)
    np.testing.assert_allclose(acquisition.gaussian_blur(constant, tf.constant([2.0])), 77.0, 1e-5)


def test_blur_matches_a_reference_gaussian_in_numpy():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (1, 16, 16, 1)).astype(np.float32)
    sigma = 1.3
    out = acquisition.gaussian_blur(tf.constant(image), tf.constant([sigma])).numpy()[0, ..., 0]
    grid = np.arange(16)
    weights = np.exp(-0.5 * ((grid[:, None] - grid[None, :]) / sigma) ** 2)
    weights /= weights.sum(1, keepdims=True)
    np.testing.assert_allclose(out, weights @ image[0, ..., 0] @ weights.T, rtol=1e-4, atol=1e-3)


def test_zoom_magnifies_around_the_centre():
    images = _images(2)
    out = acquisition.zoom(images, tf.constant([2.0, 2.0]), tf.fill([2, 2], 0.5)).numpy()
    half = SIZE // 2
    reference = tf.image.resize(
        images[:, half // 2 : half // 2 + half, half // 2 : half // 2 + half], (SIZE, SIZE)
    )
    # Away from the border (where the zoom also samples just outside the box).
    inner = np.s_[:, 2:-2, 2:-2]
    np.testing.assert_allclose(out[inner], reference.numpy()[inner], atol=1.0)
    constant = tf.fill([1, SIZE, SIZE, 3], 50.0)
    np.testing.assert_allclose(
        acquisition.zoom(constant, tf.constant([0.8]), tf.constant([[0.4, 0.6]])), 50.0, atol=1e-3
    )


def test_noise_and_jpeg_keep_the_mean():
    images = _images(8)
    layer = acquisition.AcquisitionShift(["noise"], magnitude=1.0, seed=0)
    out = layer(images, training=True).numpy()
    np.testing.assert_allclose(out.mean(), images.numpy().mean(), rtol=0.01)
    residual = (out - images.numpy()).std(axis=(1, 2, 3))
    assert residual.max() <= 0.04 * 255 * 1.1 and residual.max() > 1.0
    encoded = acquisition.jpeg(images, tf.fill([8], 40), tf.ones([8], tf.bool)).numpy()
    assert np.abs(encoded.mean(axis=(1, 2, 3)) - images.numpy().mean(axis=(1, 2, 3))).max() < 2.0
    assert np.abs(encoded - images.numpy()).mean() > 0.5  # it did re-encode


@pytest.mark.parametrize("shift", acquisition.SHIFTS)
def test_each_shift_keeps_the_image_statistics_in_a_band_at_the_default(shift):
    images = _images(16, seed=3)
    layer = acquisition.AcquisitionShift([shift], magnitude=0.5, seed=2)
    before = images.numpy()
    for _ in range(3):
        out = layer(images, training=True).numpy()
        assert out.shape == before.shape and out.min() >= 0 and out.max() <= 255
        # The batch mean moves by under 6 %, no image's mean by more than 30 grey levels
        # (except under zoom, whose point is to change how much of an image is cell).
        assert abs(out.mean() / before.mean() - 1) < 0.06, (shift, before.mean(), out.mean())
        if shift == "scale":
            continue
        per_image = np.abs(out.mean(axis=(1, 2, 3)) - before.mean(axis=(1, 2, 3)))
        # Exposure x white balance reach x1.32 at magnitude 0.5 (clipped at 255).
        assert per_image.max() < (45 if shift == "illumination" else 30), (shift, per_image.max())


@pytest.mark.integration
def test_all_shifts_keep_real_image_statistics_in_a_band():
    images = tf.constant(real_images())
    layer = acquisition.AcquisitionShift(acquisition.SHIFTS, magnitude=0.5, seed=5)
    before = images.numpy()
    for _ in range(3):
        out = layer(images, training=True).numpy()
        assert abs(out.mean() / before.mean() - 1) < 0.06
        assert abs(out.std() / before.std() - 1) < 0.35


# ------------------------------------------------------------- plumbing


def test_parse_shifts_and_config_errors():
    assert acquisition.parse_shifts("blur, stain") == ("stain", "blur")
    assert acquisition.parse_shifts("all") == acquisition.SHIFTS
    assert acquisition.parse_shifts("") == ()
    with pytest.raises(ValueError, match="unknown acquisition shift.*haze"):
        acquisition.parse_shifts("haze")
    with pytest.raises(config_lib.ConfigError, match="--acquisition_shifts='haze'"):
        config_lib.TrainConfig(model_dir="x", acquisition_shifts="haze").validate()
    with pytest.raises(config_lib.ConfigError, match="'jpeg' has no XLA kernel"):
        config_lib.TrainConfig(model_dir="x", acquisition_shifts="all", xla=True).validate()
    with pytest.raises(config_lib.ConfigError, match="--shift_magnitude"):
        config_lib.TrainConfig(model_dir="x", shift_magnitude=1.5).validate()
    config_lib.TrainConfig(model_dir="x", acquisition_shifts="stain,blur", xla=True).validate()


def test_augmenter_carries_the_shifts_and_compiles_with_xla():
    augmenter = build_augmenter(
        SIZE, shifts=("stain", "scale", "blur"), shift_magnitude=0.6, seed=1
    )
    assert augmenter.get_config()["shifts"] == ["stain", "scale", "blur"]
    clone = type(augmenter).from_config(augmenter.get_config())
    assert [s.name for s in clone.stages] == [s.name for s in augmenter.stages]
    assert "acquisition_shift" in [s.name for s in augmenter.stages]
    no_jpeg = [s for s in acquisition.SHIFTS if s != "jpeg"]
    layer = acquisition.AcquisitionShift(no_jpeg, magnitude=0.6, seed=1)
    step = tf.function(lambda x: layer(x, training=True), jit_compile=True)
    out = step(_images(2)).numpy()
    assert out.shape == (2, SIZE, SIZE, 3) and np.isfinite(out).all()


def test_shift_probability_leaves_the_other_images_untouched():
    images = _images(32, seed=4)
    layer = acquisition.AcquisitionShift(["gamma", "noise"], 1.0, probability=0.5, seed=3)
    out = layer(images, training=True).numpy()
    untouched = np.all(out == images.numpy(), axis=(1, 2, 3))
    assert 6 <= untouched.sum() <= 26  # about half, each image drawn on its own
    never = acquisition.AcquisitionShift(["gamma"], 1.0, probability=0.0, seed=3)
    np.testing.assert_array_equal(never(images, training=True), images)
    with pytest.raises(ValueError, match="probability"):
        acquisition.AcquisitionShift(["gamma"], 1.0, probability=1.5)
