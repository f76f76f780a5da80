"""On-device augmentation: identity when off, statistics bands, MixUp/CutMix."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from leukemia_tf.models.augment import (
    Augmenter,
    RandomResizedCrop,
    RandomRot90,
    RandomSaturation,
    build_augmenter,
    color_factors,
    color_layers,
    crop_and_resize,
    cutmix,
    mixup,
    sample_beta,
)
from leukemia_tf.models.heads import level_targets_to_soft
from leukemia_tf.taxonomy import Taxonomy

SIZE = 32
DATA_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"

# Statistics bands at the default magnitude (0.5), checked per component on
# batches of cell images, as fractions of the original batch mean / std and
# in grey levels per image. Keras' RandomSaturation(0.15) (0.5 is its identity,
# so it samples factors in [0, 0.15] and desaturates hard) moves the mean of
# noise images by 49%; these bands catch anything of that kind.
COLOR_MEAN_BAND = 0.03
COLOR_STD_BAND = 0.15
COLOR_PER_IMAGE_LEVELS = 13.0  # brightness is +-12.75 at magnitude 0.5
CROP_MEAN_BAND = 0.05
CROP_STD_BAND = 0.15
# The crop zooms in by up to 1.41x: on the synthetic cells (a large,
# high-contrast nucleus) that raises the std by up to ~12%, and contrast jitter
# adds to it (measured: +25% worst case synthetic, +8% on real images).
FULL_MEAN_BAND = 0.05
FULL_STD_BAND = 0.30


def cell_images(n=32, size=64, seed=0) -> np.ndarray:
    """Synthetic stained-cell images: pale background, pink cytoplasm, purple nucleus."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        img = np.array([232, 220, 226], np.float32) + rng.normal(0, 6, (size, size, 3))
        cy, cx = rng.uniform(0.35, 0.65, 2) * size
        radius = rng.uniform(0.2, 0.35) * size
        dist = np.hypot(yy - cy, xx - cx)
        cell = dist < radius
        img[cell] = np.array([205, 165, 195]) + rng.normal(0, 8, (cell.sum(), 3))
        nucleus = dist < radius * rng.uniform(0.5, 0.8)
        img[nucleus] = np.array([115, 60, 150]) + rng.normal(0, 10, (nucleus.sum(), 3))
        out[i] = img
    return np.clip(out, 0, 255)


def real_images(size=64) -> np.ndarray:
    if not DATA_DIR.is_dir():
        pytest.skip(f"real images not found at {DATA_DIR} (see ../shared/data/README.md)")
    files = sorted((DATA_DIR / "pbc").glob("*/*/*.jpg"))[::300][:16]
    files += sorted((DATA_DIR / "all_taleqani").glob("*/*/*.jpg"))[::200][:16]
    if len(files) < 8:
        pytest.skip(f"too few images under {DATA_DIR}")
    images = [
        tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(str(f)), 3), (size, size)) for f in files
    ]
    return tf.stack(images).numpy()


def _check_band(name, layer, images, mean_band, std_band, per_image_levels=None, repeats=5):
    mean0, std0 = images.mean(), images.std()
    per_image0 = images.mean(axis=(1, 2, 3))
    for _ in range(repeats):
        out = np.asarray(layer(tf.constant(images), training=True))
        assert out.shape == images.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 255.0, f"{name}: values outside [0, 255]"
        assert abs(out.mean() / mean0 - 1) < mean_band, (
            f"{name}: mean {mean0:.1f} -> {out.mean():.1f}"
        )
        assert abs(out.std() / std0 - 1) < std_band, f"{name}: std {std0:.1f} -> {out.std():.1f}"
        if per_image_levels is not None:
            shift = np.abs(out.mean(axis=(1, 2, 3)) - per_image0).max()
            assert shift < per_image_levels, f"{name}: an image's mean moved by {shift:.1f}"


# ------------------------------------------------------------------ identity


def test_augmenter_is_exact_identity_unless_training():
    images = tf.constant(cell_images(8, SIZE))
    aug = build_augmenter(SIZE, magnitude=1.0, seed=1)
    # flips + rotations (one layer), crop, 4 colour layers
    assert [stage.name for stage in aug.stages] == [
        "rot90",
        "resized_crop",
        "brightness",
        "contrast",
        "saturation",
        "hue",
    ]
    np.testing.assert_array_equal(aug(images), images)
    np.testing.assert_array_equal(aug(images, training=False), images)
    np.testing.assert_array_equal(tf.function(lambda x: aug(x, training=False))(images), images)
    assert not np.array_equal(aug(images, training=True), images)


def test_magnitude_zero_is_exact_identity_for_colour():
    images = tf.constant(cell_images(8, SIZE))
    assert color_layers(0.0) == []
    assert set(color_factors(0.0).values()) == {0.0}
    aug = build_augmenter(SIZE, magnitude=0.0, flips=False, rot90=False, crop_scale=(1, 1))
    assert aug.stages == []
    np.testing.assert_array_equal(aug(images, training=True), images)


@pytest.mark.parametrize(
    "layer",
    [
        keras.layers.RandomBrightness(0.0, value_range=(0, 255)),
        keras.layers.RandomContrast(0.0, value_range=(0, 255)),
        RandomSaturation(0.0),
        keras.layers.RandomHue((0.0, 0.0), value_range=(0, 255)),
        RandomResizedCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0)),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_each_component_is_identity_at_zero_strength(layer):
    images = cell_images(8, SIZE)
    np.testing.assert_allclose(layer(images, training=True), images, atol=1e-2)
    np.testing.assert_array_equal(layer(images, training=False), images)


def test_bad_augmenter_arguments():
    with pytest.raises(ValueError, match="magnitude must be in"):
        build_augmenter(SIZE, magnitude=2.0)
    with pytest.raises(ValueError, match="crop_scale"):
        build_augmenter(SIZE, crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="crop_scale"):
        build_augmenter(SIZE, crop_scale=(0.8, 0.5))
    with pytest.raises(ValueError, match=r"built for \[batch, 32, 32, 3\]"):
        build_augmenter(SIZE)(tf.zeros((1, 48, 48, 3)), training=True)


# ---------------------------------------------------------- statistics bands


def _components(magnitude=0.5):
    return color_layers(magnitude, seed=1)


@pytest.mark.parametrize("index", range(4), ids=["brightness", "contrast", "saturation", "hue"])
def test_colour_components_keep_statistics_synthetic(index):
    layer = _components()[index]
    _check_band(
        layer.name, layer, cell_images(), COLOR_MEAN_BAND, COLOR_STD_BAND, COLOR_PER_IMAGE_LEVELS
    )


def test_crop_and_full_augmenter_keep_statistics_synthetic():
    images = cell_images()
    _check_band("crop", RandomResizedCrop(seed=3), images, CROP_MEAN_BAND, CROP_STD_BAND)
    _check_band("augmenter", build_augmenter(64, seed=4), images, FULL_MEAN_BAND, FULL_STD_BAND)


@pytest.mark.integration
def test_augmentation_keeps_statistics_on_real_images():
    images = real_images()
    for layer in _components():
        _check_band(
            layer.name, layer, images, COLOR_MEAN_BAND, COLOR_STD_BAND, COLOR_PER_IMAGE_LEVELS
        )
    _check_band("crop", RandomResizedCrop(seed=3), images, CROP_MEAN_BAND, CROP_STD_BAND)
    _check_band("augmenter", build_augmenter(64, seed=4), images, FULL_MEAN_BAND, FULL_STD_BAND)


def test_saturation_avoids_the_keras_pitfall():
    noise = tf.random.stateless_uniform((16, SIZE, SIZE, 3), (1, 2)) * 255.0
    mean = float(tf.reduce_mean(noise))
    out = RandomSaturation(1.0, seed=0)(noise, training=True)
    assert abs(float(tf.reduce_mean(out)) / mean - 1) < 0.02
    # Keras' layer with value_range (0, 255) clips S to [0, 255] and goes
    # negative when it raises the saturation; ours is a blend, clipped.
    pixel = tf.constant([[[[200.0, 60.0, 120.0]]]])
    layer = RandomSaturation(0.5)
    layer.factor = 0.5
    gray = 0.299 * 200 + 0.587 * 60 + 0.114 * 120
    for _ in range(20):
        got = layer(pixel, training=True).numpy().ravel()
        scale = (got[0] - gray) / (200 - gray)
        assert 0.5 - 1e-4 <= scale <= 1.5 + 1e-4
        expected = np.clip(gray + scale * (np.array([200, 60, 120]) - gray), 0, 255)
        np.testing.assert_allclose(got, expected, atol=1e-3)


# ----------------------------------------------------------------- geometry


def _dihedral(image):
    out = []
    for flipped in (image, image[:, ::-1]):
        for k in range(4):
            out.append(np.rot90(flipped, k))
    return out


def _which(got, candidates):
    return [i for i, candidate in enumerate(candidates) if np.array_equal(got, candidate)]


def test_flips_and_rotations_are_symmetries_of_the_square():
    images = cell_images(64, SIZE, seed=3)
    aug = build_augmenter(SIZE, color=False, crop_scale=(1, 1), seed=5)
    out = aug(images, training=True).numpy()
    seen = set()
    for source, got in zip(images, out, strict=True):
        matches = _which(got, _dihedral(source))
        assert matches, "not a symmetry of the input"
        seen.add(matches[0])
    assert seen == set(range(8))  # all eight symmetries occur

    rot = RandomRot90(seed=2)(images, training=True).numpy()
    seen = set()
    for source, got in zip(images, rot, strict=True):
        matches = _which(got, [np.rot90(source, k) for k in range(4)])
        assert matches, "not a rotation of the input"
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}

    flips_only = build_augmenter(SIZE, color=False, rot90=False, crop_scale=(1, 1), seed=5)
    assert [stage.name for stage in flips_only.stages] == ["flip"]
    out = flips_only(images, training=True).numpy()
    for source, got in zip(images, out, strict=True):
        mirrors = [source, source[::-1], source[:, ::-1], source[::-1, ::-1]]
        assert _which(got, mirrors)


def test_crop_and_resize_matches_tf_image_resize():
    images = cell_images(2, SIZE)
    # Crop rows/cols 8..23 (fractions 0.25..0.75) and resize back to 32.
    out = crop_and_resize(
        tf.constant(images), *[tf.constant([0.25, 0.25])] * 2, *[tf.constant([0.5, 0.5])] * 2
    ).numpy()
    reference = tf.image.resize(images[:, 8:24, 8:24], (SIZE, SIZE), "bilinear").numpy()
    # Interior pixels (the borders also sample just outside the box).
    np.testing.assert_allclose(out[:, 1:-1, 1:-1], reference[:, 1:-1, 1:-1], atol=1e-3)
    full = crop_and_resize(tf.constant(images), *[tf.zeros(2)] * 2, *[tf.ones(2)] * 2)
    np.testing.assert_allclose(full, images, atol=1e-3)


def test_augmenter_is_reproducible_and_serialisable():
    images = cell_images(4, SIZE)
    first = build_augmenter(SIZE, seed=11)(images, training=True)
    second = build_augmenter(SIZE, seed=11)(images, training=True)
    np.testing.assert_array_equal(first, second)
    aug = build_augmenter(SIZE, magnitude=0.3, crop_scale=(0.6, 0.9), rot90=False, seed=2)
    clone = Augmenter.from_config(aug.get_config())
    assert clone.get_config() == aug.get_config()
    assert [type(s).__name__ for s in clone.stages] == [type(s).__name__ for s in aug.stages]


def test_augmentation_and_mixing_compile_with_xla():
    aug = build_augmenter(SIZE, seed=1)
    images = tf.constant(cell_images(4, SIZE))
    targets = tf.one_hot([0, 1, 2, 3], 4)

    @tf.function(jit_compile=True)
    def step(images, seed):
        images = aug(images, training=True)
        images, mixed = mixup(images, targets, 0.4, seed=seed)
        return cutmix(images, mixed, 1.0, seed=seed + 1)

    out_images, out_targets = step(images, tf.constant([3, 4]))
    assert out_images.shape == images.shape
    np.testing.assert_allclose(tf.reduce_sum(out_targets, -1), 1.0, atol=1e-5)


def test_augmenter_and_mixup_run_under_mirrored_strategy():
    # Logical devices must be set before TensorFlow starts: a fresh process.
    script = textwrap.dedent(
        """
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from leukemia_tf.models import build_augmenter, mixup
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            aug = build_augmenter(16, seed=1)
        @tf.function
        def step(images, targets):
            def replica_fn(images, targets):
                images = aug(images, training=True)
                return mixup(images, targets, 0.4)
            return strategy.run(replica_fn, args=(images, targets))
        data = tf.data.Dataset.from_tensor_slices(
            (tf.random.uniform((8, 16, 16, 3)) * 255, tf.one_hot(tf.range(8) % 3, 3))
        ).batch(4)
        for images, targets in strategy.experimental_distribute_dataset(data):
            out_images, out_targets = step(images, targets)
            shapes = [t.shape for t in strategy.experimental_local_results(out_images)]
            assert shapes == [(2, 16, 16, 3)] * 2, shapes
        print("OK")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# ----------------------------------------------------------- MixUp / CutMix


@pytest.mark.parametrize("alpha", [0.4, 1.0, 2.0])
def test_sample_beta_matches_the_beta_distribution(alpha):
    samples = sample_beta(alpha, 20000, seed=7).numpy()
    assert samples.min() >= 0.0 and samples.max() <= 1.0
    assert abs(samples.mean() - 0.5) < 0.01
    variance = 1.0 / (4.0 * (2.0 * alpha + 1.0))
    assert abs(samples.var() / variance - 1) < 0.05
    np.testing.assert_array_equal(samples, sample_beta(alpha, 20000, seed=7).numpy())
    with pytest.raises(ValueError, match="alpha must be > 0"):
        sample_beta(0.0, 4)


def test_mixup_mixes_images_and_targets_with_one_weight_per_example():
    images = tf.constant(cell_images(6, SIZE))
    targets = tf.one_hot([0, 1, 2, 3, 4, 5], 6)
    mixed, mixed_targets = mixup(images, targets, 0.4, seed=3)
    lam = np.diag(mixed_targets.numpy())  # each example's own class weight
    np.testing.assert_allclose(mixed_targets.numpy().sum(1), 1.0, atol=1e-6)
    partner = images.numpy()[::-1]
    expected = lam[:, None, None, None] * images.numpy() + (1 - lam[:, None, None, None]) * partner
    np.testing.assert_allclose(mixed, expected, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="soft targets"):
        mixup(images, tf.constant([0, 1, 2, 3, 4, 5]), 0.4)


def test_cutmix_pastes_a_box_and_weights_targets_by_area():
    images = tf.constant(
        np.arange(6, dtype=np.float32)[:, None, None, None]
        * np.ones((6, SIZE, SIZE, 3), np.float32)
    )
    targets = tf.one_hot([0, 1, 2, 3, 4, 5], 6)
    pasted, mixed_targets = cutmix(images, targets, 1.0, seed=5)
    pasted = pasted.numpy()
    for i in range(6):
        from_partner = np.mean(pasted[i, ..., 0] == 5 - i)
        assert np.all((pasted[i] == i) | (pasted[i] == 5 - i))
        assert mixed_targets[i, i].numpy() == pytest.approx(1 - from_partner, abs=1e-6)
        assert mixed_targets[i, 5 - i].numpy() == pytest.approx(from_partner, abs=1e-6)


def test_hierarchical_targets_mix_every_level_with_the_same_weight():
    tax = Taxonomy.load()
    # pre_b reaches all 4 levels, normal only level 0: in a mixed pair, the
    # deeper levels keep the weight of the side that has them.
    names = ["pre_b", "CLL", "normal"]
    soft = level_targets_to_soft(np.stack([tax.encode(n) for n in names]), tax)
    _, mixed = mixup(tf.zeros((3, SIZE, SIZE, 3)), soft, 0.4, seed=9)
    lam = mixed["level_0"].numpy()[0, tax.level_index("leukemia")] - 0.0
    # Example 0 (pre_b) is paired with example 2 (normal).
    row_sums = {k: v.numpy().sum(1) for k, v in mixed.items()}
    assert row_sums["level_0"][0] == pytest.approx(1.0, abs=1e-6)
    for level in ("level_1", "level_2", "level_3"):
        assert row_sums[level][0] == pytest.approx(lam, abs=1e-6)
    # The middle example is paired with itself: unchanged.
    for key, value in mixed.items():
        np.testing.assert_allclose(value.numpy()[1], soft[key].numpy()[1], atol=1e-6)
