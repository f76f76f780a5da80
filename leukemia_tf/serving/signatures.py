"""The serving graph: request tensors -> pixels -> model -> named outputs.

Two signatures share one model and one output head:

* ``serving_default``: ``image_bytes`` ``tf.string [N]``, encoded JPEG, PNG,
  BMP or GIF (first frame) images of up to
  :data:`leukemia_tf.data.images.MAX_IMAGE_PIXELS` pixels. Each is checked,
  decoded and resized by
  :func:`leukemia_tf.data.preprocessing.decode_and_resize_checked`: the
  decode and resize the input pipeline uses for training and evaluation, so
  a served model sees the pixels it was evaluated on, after the checks the
  data set builders make (an image too large by its header is refused before
  decoding; a JPEG cut short behind an end-of-image marker is refused).
* ``predict_pixels``: ``pixels`` ``float32 [N, H, W, 3]``, RGB values in
  [0, 255]. At the model's own size (``H == W == S``) the values go to the
  model unchanged (no rounding: exactly what ``model(pixels)`` computes). Any
  other size is rounded to uint8 and resized per image with
  :func:`~leukemia_tf.data.preprocessing.resize_and_pad`, the resize of the
  input pipeline (aspect ratio kept, padded with the image's mean colour).

Both return :func:`postprocess`'s outputs: ``probabilities`` ``float32
[N, C]``, ``class_ids`` ``int64 [N]`` (the argmax), ``class_names`` ``string
[N]`` and, for a hierarchical model, ``level_k_probabilities`` ``float32
[N, n_k]`` (the marginal probability of every taxonomy node of level ``k``)
and ``level_k_names`` ``string [N]``: the top-down greedy decision (at each
level the most probable child of the node chosen one level up; ``""`` below
the level where the chosen node is a leaf). Both also return the trust
outputs of :func:`leukemia_tf.models.trust.trust_outputs`: ``max_probability``,
``margin`` and ``energy`` always; with the run's fitted trust statistics (graph
constants) ``mahalanobis``, ``knn_distance``, ``referred`` and
``predicted_node`` / ``predicted_node_probability``.

Bad requests fail with ``InvalidArgument`` naming the problem, never with a
crash: an image that cannot be decoded is reported with its index in the
batch, its size and the reason (too large, cut short, or what its first bytes
say it is when the decoder itself fails).
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf

from leukemia_tf.data import preprocessing
from leukemia_tf.models import heads
from leukemia_tf.models import trust as trust_lib
from leukemia_tf.models.heads import level_key
from leukemia_tf.models.label_space import LabelSpace

#: Signature names (``serving_default`` is what TF Serving uses by default).
SERVING_DEFAULT = "serving_default"
PREDICT_PIXELS = "predict_pixels"
SIGNATURES = (SERVING_DEFAULT, PREDICT_PIXELS)

#: Input names of the two signatures.
IMAGE_BYTES = "image_bytes"
PIXELS = "pixels"

#: Output names.
PROBABILITIES = "probabilities"
CLASS_IDS = "class_ids"
CLASS_NAMES = "class_names"


def level_probabilities_key(level: int) -> str:
    """Output name of level ``level``'s node probabilities (hierarchical models)."""
    return f"level_{level}_probabilities"


def level_names_key(level: int) -> str:
    """Output name of level ``level``'s greedy decision (hierarchical models)."""
    return f"level_{level}_names"


def level_ids_key(level: int) -> str:
    """Output name of level ``level``'s greedy decision as a node index (portable exports)."""
    return f"level_{level}_ids"


# ------------------------------------------------------------------ outputs
def greedy_decisions(level_probs: Mapping[str, tf.Tensor], label_space: LabelSpace) -> list:
    """Top-down greedy decision at every taxonomy level.

    Level 0 takes the most probable top-level node; each further level the
    most probable child of the node chosen above it. Within one sibling group
    the marginals are the conditionals times the same parent probability, so
    an argmax over the marginals of the children is the argmax of the
    conditionals. Where the chosen node is a leaf the decision stops: ``-1``
    from there down.

    Args:
      level_probs: ``{"level_k": [B, n_k]}`` node marginals
        (:meth:`LabelSpace.level_probabilities`).
      label_space: a hierarchical label space.

    Returns:
      One ``int32 [B]`` tensor per level: the index of the chosen node among
      the level's nodes, or ``-1``.
    """
    taxonomy = label_space.taxonomy
    return heads.greedy_path(
        [level_probs[level_key(level)] for level in range(taxonomy.num_levels)], taxonomy
    )


def postprocess(
    outputs: Mapping[str, tf.Tensor],
    label_space: LabelSpace,
    temperature: float = 1.0,
    trust: trust_lib.TrustStatistics | None = None,
    *,
    names: bool = True,
) -> dict[str, tf.Tensor]:
    """Named predictions from the model's raw outputs (serving and ``predict``).

    Args:
      outputs: the model's output dict (``{"logits"}`` or ``{"level_k"}``),
        with ``"features"`` (:func:`trust.with_features`) when ``trust`` is given.
      label_space: the model's classes.
      temperature: divides every logit (1: as trained).
      trust: the run's fitted trust statistics, or None.
      names: return the string outputs. False (the portable exports, whose
        runtimes have no string ops): no ``class_names`` (``class_ids``
        indexes the labels), ``level_k_ids`` (int32, the node's index in
        taxonomy level ``k``, -1 undecided) instead of ``level_k_names``, and
        ``predicted_node_id`` instead of ``predicted_node``.

    Returns:
      ``{"probabilities", "class_ids", "class_names"}``, the trust outputs
      (:func:`leukemia_tf.models.trust.trust_outputs`: always
      ``max_probability``, ``margin``, ``energy``; with ``trust`` the feature
      scores, ``referred`` and ``predicted_node``) and, for a hierarchical
      model, ``level_k_probabilities`` and ``level_k_names`` per level (see
      the module docstring).
    """
    trust_out = trust_lib.trust_outputs(dict(outputs), label_space, trust, names=names)
    probabilities = label_space.probabilities(outputs, temperature)
    class_ids = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
    out = {PROBABILITIES: probabilities, CLASS_IDS: class_ids}
    if names:
        out[CLASS_NAMES] = tf.gather(tf.constant(label_space.class_names, tf.string), class_ids)
    if label_space.head == "hierarchical":
        level_probs = label_space.level_probabilities(outputs, temperature)
        levels = label_space.taxonomy.levels
        for level, index in enumerate(greedy_decisions(level_probs, label_space)):
            out[level_probabilities_key(level)] = level_probs[level_key(level)]
            if not names:
                out[level_ids_key(level)] = tf.cast(index, tf.int32)
                continue
            out[level_names_key(level)] = trust_lib.names_at(index, list(levels[level]))
    out.update(trust_out)
    return out


def output_keys(
    label_space: LabelSpace, trust: trust_lib.TrustStatistics | None = None, *, names: bool = True
) -> list[str]:
    """The output names :func:`postprocess` returns (with the same ``names``), in order."""
    keys = [PROBABILITIES, CLASS_IDS] + ([CLASS_NAMES] if names else [])
    if label_space.head == "hierarchical":
        for level in range(label_space.taxonomy.num_levels):
            keys += [
                level_probabilities_key(level),
                level_names_key(level) if names else level_ids_key(level),
            ]
    return keys + trust_lib.output_keys(trust, names=names)


# ------------------------------------------------------------------- inputs
_FORMATS = (  # (name, magic bytes at offset 0)
    ("JPEG", b"\xff\xd8\xff"),
    ("PNG", b"\x89PNG\r\n\x1a\n"),
    ("GIF", b"GIF8"),
    ("BMP", b"BM"),
)


def describe_bytes(image_bytes: tf.Tensor) -> tf.Tensor:
    """What the first bytes of each encoded image say it is (for error messages).

    Args:
      image_bytes: ``tf.string [N]``.

    Returns:
      ``tf.string [N]``: ``"a corrupt or truncated PNG"``, ``"empty (0
      bytes)"`` or ``"not a JPEG, PNG, BMP or GIF image"``.
    """
    kind = tf.fill(tf.shape(image_bytes), "not a JPEG, PNG, BMP or GIF image")
    for name, magic in reversed(_FORMATS):
        head = tf.strings.substr(image_bytes, 0, len(magic))
        kind = tf.where(tf.equal(head, magic), f"a corrupt or truncated {name}", kind)
    return tf.where(tf.strings.length(image_bytes) == 0, "empty (0 bytes)", kind)


def decode_batch(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
    """Checks, decodes and resizes a batch of encoded images; fails naming every bad one.

    Each image goes through ``decode_and_resize_checked``, which returns the
    reason for an image it refuses (too large by its header, a JPEG cut
    short). The decodes run in a per-request ``tf.data`` pipeline (parallel,
    order kept) whose ``ignore_errors`` turns a decoder's own failure into a
    missing index instead of an opaque op error, so the request fails with
    one ``InvalidArgument`` that lists each bad image by its index in the
    batch.

    Args:
      image_bytes: ``tf.string [N]``.
      image_size: the model's input side ``S``.

    Returns:
      ``uint8 [N, S, S, 3]``.

    Raises:
      tf.errors.InvalidArgumentError: (at run time) an image that is refused
        or cannot be decoded, e.g. ``image 2 of the batch (1043 bytes): a
        corrupt or truncated JPEG`` or ``image 0 of the batch (632 bytes):
        image too large: 65000 x 65000 = 4225000000 pixels, over the limit of
        50000000 pixels``.
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    count = tf.shape(image_bytes, out_type=tf.int64)[0]
    indices = tf.range(count)
    ds = tf.data.Dataset.from_tensor_slices((indices, image_bytes))
    ds = ds.map(
        lambda i, b: (i, *preprocessing.decode_and_resize_checked(b, image_size)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    ds = ds.ignore_errors(log_warning=False)
    # A sentinel keeps the batch non-empty (get_single_element needs one
    # element) when the request is empty or every image failed.
    sentinel = (
        tf.constant(-1, tf.int64),
        tf.zeros([image_size, image_size, 3], tf.uint8),
        tf.constant(""),
    )
    ds = ds.concatenate(tf.data.Dataset.from_tensors(sentinel))
    decoded_indices, images, problems = ds.batch(count + 1).get_single_element()
    decoded_indices, images, problems = decoded_indices[:-1], images[:-1], problems[:-1]

    # Two kinds of failure: refused with a reason (decoded_indices, problems),
    # and failed in the decoder (missing from decoded_indices), described by
    # the first bytes.
    refused = tf.not_equal(problems, "")
    undecodable = tf.sparse.to_dense(
        tf.sets.difference(indices[None, :], decoded_indices[None, :])
    )[0]
    failed = tf.concat([tf.boolean_mask(decoded_indices, refused), undecodable], axis=0)
    reasons = tf.concat(
        [
            tf.boolean_mask(problems, refused),
            tf.gather(describe_bytes(image_bytes), undecodable),
        ],
        axis=0,
    )
    order = tf.argsort(failed)
    failed, reasons = tf.gather(failed, order), tf.gather(reasons, order)
    ok = tf.equal(tf.size(failed), 0)
    details = tf.strings.join(
        [
            "image ",
            tf.strings.as_string(failed),
            " of the batch (",
            tf.strings.as_string(tf.strings.length(tf.gather(image_bytes, failed))),
            " bytes): ",
            reasons,
        ]
    )
    message = tf.strings.reduce_join(details, separator="; ")
    check = tf.debugging.Assert(
        ok,
        [
            "Invalid image in the request (expected JPEG, PNG, BMP or GIF bytes):",
            message,
        ],
        name="check_images_decode",
    )
    with tf.control_dependencies([check]):
        return tf.identity(images)


def prepare_pixels(pixels: tf.Tensor, image_size: int) -> tf.Tensor:
    """Float pixels of any size -> the model's ``float32 [N, S, S, 3]`` input.

    Args:
      pixels: ``float32 [N, H, W, 3]``, RGB in [0, 255].
      image_size: the model's input side ``S``.

    Returns:
      ``pixels`` unchanged when ``H == W == S``; otherwise each image rounded
      to uint8, resized with ``resize_and_pad`` (the input pipeline's resize)
      and cast back to float32.

    Raises:
      tf.errors.InvalidArgumentError: (at run time) a value outside [0, 255]
        or not finite.
    """
    pixels = tf.convert_to_tensor(pixels, tf.float32)
    low = tf.reduce_min(pixels)
    high = tf.reduce_max(pixels)
    empty = tf.equal(tf.size(pixels), 0)
    in_range = tf.logical_or(
        empty,
        tf.logical_and(
            tf.reduce_all(tf.math.is_finite(pixels)),
            tf.logical_and(low >= 0.0, high <= 255.0),
        ),
    )
    check = tf.debugging.Assert(
        in_range,
        [
            "predict_pixels expects RGB values in [0, 255] (not normalised, no NaN/Inf); got min",
            low,
            "max",
            high,
        ],
        name="check_pixel_range",
    )
    with tf.control_dependencies([check]):
        pixels = tf.identity(pixels)
    shape = tf.shape(pixels)
    at_size = tf.logical_and(tf.equal(shape[1], image_size), tf.equal(shape[2], image_size))

    def resize() -> tf.Tensor:
        as_uint8 = tf.saturate_cast(tf.round(pixels), tf.uint8)
        resized = tf.map_fn(
            lambda image: preprocessing.resize_and_pad(image, image_size),
            as_uint8,
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.uint8),
        )
        return tf.cast(resized, tf.float32)

    def unchanged() -> tf.Tensor:
        return tf.ensure_shape(pixels, [None, image_size, image_size, 3])

    return tf.ensure_shape(tf.cond(at_size, unchanged, resize), [None, image_size, image_size, 3])


# ------------------------------------------------------------------- module
class ServingModule(tf.Module):
    """The exported object: two signatures, the weights they use, the assets.

    The Keras model is not an attribute (its layers would be walked and
    serialised as Keras objects); the signatures are plain ``tf.function``
    graphs, and the variables they capture are tracked explicitly, the way
    ``keras.export.ExportArchive`` does it. The saved graph needs neither
    Keras nor this package to load and run.

    Args:
      model: the float32 Keras classifier (pixels 0-255 ``[B, S, S, 3]``).
      label_space: its classes.
      image_size: its input side ``S``.
      temperature: divides every logit (1: uncalibrated).
      assets: ``{name: path}`` files to ship in ``assets/``.
      trust: the fitted trust statistics (their arrays become constants of
        the graph); None: the logit scores only.
    """

    def __init__(
        self,
        model: keras.Model,
        label_space: LabelSpace,
        image_size: int,
        temperature: float = 1.0,
        assets: Mapping[str, str] | None = None,
        trust: trust_lib.TrustStatistics | None = None,
    ):
        super().__init__(name="leukemia_serving")
        image_size = preprocessing.check_image_size(image_size)
        temperature = float(temperature)
        if not np.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if trust is not None:
            model = trust_lib.with_features(model)

        def predict(images: tf.Tensor) -> dict[str, tf.Tensor]:
            count = tf.shape(images)[0]
            # An empty batch trips BatchNorm's broadcasting in the graph: run
            # one blank image instead and return the empty slice.
            images = tf.cond(
                count > 0,
                lambda: tf.cast(images, tf.float32),
                lambda: tf.zeros([1, image_size, image_size, 3], tf.float32),
            )
            outputs = model(images, training=False)
            named = postprocess(outputs, label_space, temperature, trust)
            return {k: v[:count] for k, v in named.items()}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_BYTES)])
        def serving_default(image_bytes):
            return predict(decode_batch(image_bytes, image_size))

        @tf.function(
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name=PIXELS)]
        )
        def predict_pixels(pixels):
            return predict(prepare_pixels(pixels, image_size))

        self.serving_default = serving_default
        self.predict_pixels = predict_pixels
        # Track exactly the variables the graphs read (tf.Variables under the
        # Keras wrappers), so that the SavedModel restores them.
        seen: dict[int, tf.Variable] = {}
        for fn in self.signatures.values():
            for variable in fn.variables:
                seen.setdefault(id(variable), variable)
        self.model_variables = list(seen.values())
        self.assets = {
            name: tf.saved_model.Asset(path) for name, path in sorted((assets or {}).items())
        }

    @property
    def signatures(self) -> dict:
        """``{name: concrete function}`` to pass to ``tf.saved_model.save``."""
        # Traced once with the input signature; these calls do not retrace.
        return {
            SERVING_DEFAULT: self.serving_default.get_concrete_function(),
            PREDICT_PIXELS: self.predict_pixels.get_concrete_function(),
        }
