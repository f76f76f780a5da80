"""Per-image trust scores, referral and hierarchical back-off, computed in the model graph.

The same TensorFlow ops run in ``predict``, ``evaluate`` and both signatures
of the exported SavedModel, so a TF Serving client gets the numbers the
evaluation report measured.

Scores (all at temperature 1, the model's own logits, so that they and the
thresholds fitted on them do not depend on ``--apply_temperature``):

* ``max_probability``: the largest class probability (Hendrycks and Gimpel,
  2017). Higher is more trustworthy.
* ``margin``: the largest minus the second-largest class probability.
  Higher is more trustworthy.
* ``energy``: ``-logsumexp`` of the logits (Liu et al., 2020); for a
  hierarchical head, of the joint logit of each class (the sum of the
  conditional logits along its path). Lower is more trustworthy.
* ``mahalanobis``: the smallest squared Mahalanobis distance of the pooled
  backbone features to a class mean, with one covariance shared by the
  classes (Lee et al., 2018), fitted on the training split. Lower is more
  trustworthy.
* ``knn_distance``: the Euclidean distance of the L2-normalised pooled
  features to their k-th nearest neighbour among (up to
  :data:`DEFAULT_MAX_BANK`) normalised training features (Sun et al., 2022).
  Lower is more trustworthy.

The feature statistics and the thresholds (:class:`TrustStatistics`) are
fitted after training by :mod:`leukemia_tf.trust_lib` and stored in the run
directory (``trust.json`` and ``trust_features.npz``).

Referral: an image is *referred* (left to a human) when it is *uncertain*
(its selection score is on the wrong side of the threshold fitted on the
validation split for a target coverage or a maximum risk) or *unfamiliar*
(``out_of_distribution``: its out-of-distribution gate score, by default the
Mahalanobis distance, is beyond what a stated fraction of the validation
images reach). The gate catches what the probabilities cannot: another
laboratory's images, on which a model can be confidently wrong.

Back-off: the top-down greedy walk down the taxonomy (at each level the most
probable child of the node chosen above) stops at the first level whose
node probability is below that level's threshold (fitted on validation for a
stated accuracy); ``predicted_node`` is the deepest node accepted, ``""``
when not even a top-level node is. A flat head over taxonomy nodes walks the
summed class probabilities; a run without a taxonomy walks a one-level tree
of its classes (the class, or nothing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os

import keras
import numpy as np
import tensorflow as tf

from leukemia_tf.models import heads
from leukemia_tf.models.label_space import LabelSpace
from leukemia_tf.taxonomy import Taxonomy

#: Output key of the pooled backbone features (:func:`with_features`).
FEATURES = "features"

#: Every score, and whether a higher value means more trustworthy.
HIGHER_IS_TRUST = {
    "max_probability": True,
    "margin": True,
    "energy": False,
    "mahalanobis": False,
    "knn_distance": False,
}
#: Scores computed from the logits alone (no fitted statistics needed).
LOGIT_SCORES = ("max_probability", "margin", "energy")
#: Scores that need the feature statistics fitted on the training split.
FEATURE_SCORES = ("mahalanobis", "knn_distance")
SCORES = tuple(HIGHER_IS_TRUST)

#: Serving / predict output names of the decisions.
REFERRED = "referred"
OUT_OF_DISTRIBUTION = "out_of_distribution"
PREDICTED_NODE = "predicted_node"
PREDICTED_NODE_PROBABILITY = "predicted_node_probability"
#: The numeric form of ``predicted_node`` (portable exports): an index into
#: :func:`backoff_node_names`, -1 for none.
PREDICTED_NODE_ID = "predicted_node_id"

#: Name scope of the feature-score ops (see :func:`feature_scores`).
FEATURE_SCORES_SCOPE = "trust_feature_scores"

DEFAULT_KNN_K = 10
DEFAULT_MAX_BANK = 20000

#: Files in the run directory.
TRUST_FILE = "trust.json"
FEATURES_FILE = "trust_features.npz"


#: Why a fold ensemble has no trust statistics.
ENSEMBLE_HAS_NO_FEATURES = (
    "a fold ensemble has no single feature space (each fold model has its own), so no trust "
    "statistics are fitted for it (no mahalanobis, knn_distance, referral or back-off); its "
    "logit scores (max_probability, margin, energy) are computed as for any model"
)


class TrustNotFittedError(FileNotFoundError):
    """The run has no trust statistics (trained before they existed, or never fitted)."""


def fit_command(model_dir: str | os.PathLike) -> str:
    """The command that fits (or refits) a run's trust statistics."""
    return f"python -m leukemia_tf.fit_trust --model_dir={os.fspath(model_dir)}"


def check_score(name: str, flag: str = "--selection_score") -> str:
    if name not in HIGHER_IS_TRUST:
        raise ValueError(f"{flag}={name!r} is not a trust score; choose one of {list(SCORES)}")
    return name


# ------------------------------------------------------------------ features
def with_features(model: keras.Model) -> keras.Model:
    """The classifier with one more output: ``"features"``, the pooled backbone features.

    The new model shares every layer (and weight) with ``model``: the head's
    input tensor in the classifier's graph is added to the output dict.

    Raises:
      ValueError: ``model`` is a fold ensemble (:mod:`leukemia_tf.models.ensemble`),
        whose fold models each have their own features.
    """
    from leukemia_tf.models import ensemble

    if ensemble.is_ensemble(model):
        raise ValueError(ENSEMBLE_HAS_NO_FEATURES)
    head = model.get_layer("head")
    outputs = dict(model.output) if isinstance(model.output, dict) else {"logits": model.output}
    return keras.Model(model.input, {**outputs, FEATURES: head.input}, name=f"{model.name}_trust")


# -------------------------------------------------------------- statistics
@dataclasses.dataclass
class TrustStatistics:
    """What is fitted after training; stored with the run and in the SavedModel.

    Attributes:
      class_means: ``[C, D]`` mean training features per class (rows of
        classes absent from the training split are dropped; ``mean_classes``
        names the rest).
      precision: ``[D, D]`` inverse of the shared (tied, shrunk) covariance.
      bank: ``[M, D]`` L2-normalised training features for the k-NN distance.
      knn_k: the neighbour whose distance is the score.
      selection: ``None`` or ``{"score", "threshold" (None: refer all),
        "target", "value", "max_referred_fraction", ...}``.
      backoff: ``None`` or ``{"accuracy", "thresholds": [float | None per
        level], "levels": [[node names] per level], ...}``.
      record: everything else written to ``trust.json`` (what, when, on which split).
    """

    class_means: np.ndarray
    precision: np.ndarray
    bank: np.ndarray
    knn_k: int
    mean_classes: list[str]
    selection: dict | None = None
    backoff: dict | None = None
    record: dict = dataclasses.field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.class_means.shape[1])


def fit_feature_statistics(
    features: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    knn_k: int = DEFAULT_KNN_K,
    max_bank: int = DEFAULT_MAX_BANK,
    shrinkage: float = 1e-3,
    seed: int = 0,
) -> TrustStatistics:
    """Class means, tied precision and the k-NN bank from training features.

    Args:
      features: ``[N, D]`` pooled features of the training split.
      labels: ``[N]`` class indices.
      class_names: the model's classes.
      knn_k: the neighbour whose distance is the k-NN score (>= 1).
      max_bank: at most this many training features are kept (a fixed random
        sample: a stratified subset keeps the classes' proportions).
      shrinkage: the covariance is ``(1 - s) S + s (tr(S) / D) I`` (Ledoit-Wolf
        style shrinkage towards a scaled identity), so that it is invertible
        whatever the feature dimension and the number of examples.
      seed: for the bank's sample.

    Raises:
      ValueError: no features, a length mismatch, non-finite features,
        ``knn_k`` < 1 or larger than the bank.
    """
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels, np.int64)
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"features must be a non-empty [N, D] array, got shape {features.shape}")
    if len(labels) != len(features):
        raise ValueError(f"{len(labels)} labels for {len(features)} feature rows")
    if not np.isfinite(features).all():
        raise ValueError(
            f"{int((~np.isfinite(features)).any(axis=1).sum())} training feature rows are not "
            "finite: the model produces NaN/Inf features"
        )
    if isinstance(knn_k, bool) or int(knn_k) < 1:
        raise ValueError(f"--knn_k={knn_k!r}: must be an integer >= 1")
    if int(max_bank) < 1:
        raise ValueError(f"--max_bank={max_bank!r}: must be an integer >= 1")
    present = sorted(set(labels.tolist()))
    means = np.stack([features[labels == c].mean(axis=0) for c in present])
    centred = features - means[np.searchsorted(present, labels)]
    dim = features.shape[1]
    cov = centred.T @ centred / max(len(features) - len(present), 1)
    cov = (1.0 - shrinkage) * cov + shrinkage * (np.trace(cov) / dim + 1e-12) * np.eye(dim)
    precision = np.linalg.inv(cov)
    precision = (precision + precision.T) / 2.0
    rng = np.random.default_rng(seed)
    if len(features) > max_bank:
        keep = np.sort(rng.choice(len(features), size=int(max_bank), replace=False))
    else:
        keep = np.arange(len(features))
    bank = features[keep]
    bank = bank / np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
    if int(knn_k) > len(bank):
        raise ValueError(f"--knn_k={knn_k}: larger than the {len(bank)} training features")
    return TrustStatistics(
        class_means=means.astype(np.float32),
        precision=precision.astype(np.float32),
        bank=bank.astype(np.float32),
        knn_k=int(knn_k),
        mean_classes=[class_names[c] for c in present],
    )


# ------------------------------------------------------------------ scores
def _class_logits(outputs: dict, label_space: LabelSpace) -> tf.Tensor:
    """``[B, C]`` unnormalised log-scores of the classes (for the energy)."""
    if label_space.head == "flat":
        return tf.cast(outputs["logits"], tf.float32)
    taxonomy = label_space.taxonomy
    columns = []
    for name in label_space.class_names:
        total = 0.0
        for ancestor in taxonomy.path(name):
            level = taxonomy.depth(ancestor)
            logits = tf.cast(outputs[heads.level_key(level)], tf.float32)
            total += logits[:, taxonomy.level_index(ancestor)]
        columns.append(total)
    return tf.stack(columns, axis=-1)


def logit_scores(outputs: dict, label_space: LabelSpace) -> dict[str, tf.Tensor]:
    """``max_probability``, ``margin`` and ``energy`` (``[B]`` float32 each)."""
    probs = label_space.probabilities(outputs, 1.0)
    k = min(2, label_space.num_classes)
    top = tf.math.top_k(probs, k=k).values
    margin = top[:, 0] - top[:, 1] if k == 2 else top[:, 0]
    energy = -tf.reduce_logsumexp(_class_logits(outputs, label_space), axis=-1)
    return {"max_probability": top[:, 0], "margin": margin, "energy": energy}


def feature_scores(features: tf.Tensor, stats: TrustStatistics) -> dict[str, tf.Tensor]:
    """``mahalanobis`` and ``knn_distance`` (``[B]`` float32 each) of pooled features.

    The ops live under the name scope :data:`FEATURE_SCORES_SCOPE`, which the
    int8 LiteRT export keeps in float (distances to fitted statistics do not
    survive 8-bit activations).
    """
    with tf.name_scope(FEATURE_SCORES_SCOPE):
        features = tf.cast(features, tf.float32)
        means = tf.constant(stats.class_means)
        precision = tf.constant(stats.precision)
        diff = features[:, None, :] - means[None, :, :]  # [B, C, D]
        distances = tf.einsum("bcd,de,bce->bc", diff, precision, diff)
        mahalanobis = tf.reduce_min(distances, axis=-1)
        normed = tf.math.l2_normalize(features, axis=-1)
        similarity = tf.matmul(normed, tf.constant(stats.bank), transpose_b=True)  # [B, M]
        kth = tf.math.top_k(similarity, k=stats.knn_k).values[:, -1]
        knn = tf.sqrt(tf.maximum(2.0 - 2.0 * kth, 0.0))
    return {"mahalanobis": mahalanobis, "knn_distance": knn}


# ---------------------------------------------------------------- back-off
def backoff_tree(label_space: LabelSpace) -> Taxonomy:
    """The tree the back-off walks: the run's taxonomy, or its classes as one level."""
    if label_space.taxonomy is not None:
        return label_space.taxonomy
    return Taxonomy({name: None for name in label_space.class_names}, source="<classes>")


def level_probabilities(outputs: dict, label_space: LabelSpace) -> list[tf.Tensor]:
    """Per level of :func:`backoff_tree`, ``[B, n_k]`` node probabilities at temperature 1.

    Hierarchical head: the marginals. Flat head over taxonomy nodes: the sum
    of the probabilities of the classes at or below each node. No taxonomy:
    the class probabilities (one level).
    """
    if label_space.head == "hierarchical":
        marginals = label_space.level_probabilities(outputs, 1.0)
        return [marginals[heads.level_key(k)] for k in range(label_space.taxonomy.num_levels)]
    probs = label_space.probabilities(outputs, 1.0)
    if label_space.taxonomy is None:
        return [probs]
    membership = label_space.taxonomy.level_membership(label_space.class_names)
    return [tf.matmul(probs, tf.constant(matrix)) for matrix in membership]


def backoff_node_names(tree: Taxonomy) -> list[str]:
    """The nodes :func:`backoff_node_ids` indexes: every level of ``tree``, top first."""
    return [name for level in tree.levels for name in level]


def backoff_node_ids(
    level_probs: list[tf.Tensor], tree: Taxonomy, thresholds: list[float | None]
) -> tuple[tf.Tensor, tf.Tensor]:
    """The deepest node accepted by the thresholded greedy walk, as an index.

    Returns:
      ``(ids [B] int32, probability [B] float32)``: the index of the node in
      :func:`backoff_node_names`, or -1 and 0 when not even a top-level node
      passes its threshold.
    """
    batch = tf.shape(level_probs[0])[0]
    ids = tf.fill([batch], -1)
    probability = tf.zeros([batch], tf.float32)
    alive = tf.ones([batch], tf.bool)
    path = heads.greedy_path(level_probs, tree)
    offset = 0
    for level, (probs, index) in enumerate(zip(level_probs, path, strict=True)):
        threshold = thresholds[level] if level < len(thresholds) else None
        depth = len(tree.levels[level])
        # A one-hot sum rather than a batched gather: the same value, and an op
        # every runtime has (LiteRT's batched GATHER fails on a dynamic batch).
        chosen = tf.one_hot(tf.maximum(index, 0), depth, dtype=probs.dtype)
        best = tf.reduce_sum(probs * chosen, axis=-1)
        passes = (index >= 0) & (best > 0)
        passes &= best >= (np.inf if threshold is None else float(threshold))
        alive &= passes
        ids = tf.where(alive, tf.cast(index, tf.int32) + offset, ids)
        probability = tf.where(alive, best, probability)
        offset += depth
    return ids, probability


def backoff_nodes(
    level_probs: list[tf.Tensor], tree: Taxonomy, thresholds: list[float | None]
) -> tuple[tf.Tensor, tf.Tensor]:
    """The deepest node accepted by the thresholded greedy walk.

    Returns:
      ``(names [B] string, probability [B] float32)``: ``""`` and 0 when not
      even a top-level node passes its threshold.
    """
    ids, probability = backoff_node_ids(level_probs, tree, thresholds)
    return names_at(ids, backoff_node_names(tree)), probability


def names_at(ids: tf.Tensor, names: list[str]) -> tf.Tensor:
    """``[B]`` string: ``names[id]`` for each id, ``""`` for a negative id (no decision)."""
    table = tf.constant([*names, ""], tf.string)
    return tf.gather(table, tf.where(ids < 0, len(names), ids))


# ----------------------------------------------------------------- outputs
def trust_outputs(
    outputs: dict, label_space: LabelSpace, stats: TrustStatistics | None, *, names: bool = True
) -> dict[str, tf.Tensor]:
    """Every trust output for the model's raw outputs (``outputs[FEATURES]`` when fitted).

    Returns:
      The logit scores always; with ``stats`` the feature scores; with a
      fitted selection ``referred`` (bool ``[B]``); with fitted back-off
      thresholds ``predicted_node`` (string ``[B]``; with ``names=False``
      ``predicted_node_id``, int32, see :func:`backoff_node_ids`) and
      ``predicted_node_probability``.
    """
    out = logit_scores(outputs, label_space)
    if stats is None:
        return out
    out.update(feature_scores(outputs[FEATURES], stats))
    if stats.selection is not None:
        selection = stats.selection
        referred = _rejected(out[selection["score"]], selection["score"], selection["threshold"])
        gate = selection.get("ood_score")
        if gate:
            unfamiliar = _rejected(out[gate], gate, selection["ood_threshold"])
            out[OUT_OF_DISTRIBUTION] = unfamiliar
            referred |= unfamiliar
        out[REFERRED] = referred
    if stats.backoff is not None:
        tree = backoff_tree(label_space)
        ids, probability = backoff_node_ids(
            level_probabilities(outputs, label_space), tree, stats.backoff["thresholds"]
        )
        if names:
            out[PREDICTED_NODE] = names_at(ids, backoff_node_names(tree))
        else:
            out[PREDICTED_NODE_ID] = ids
        out[PREDICTED_NODE_PROBABILITY] = probability
    return out


def _rejected(score: tf.Tensor, name: str, threshold: float | None) -> tf.Tensor:
    """``[B]`` bool: the score is on the untrustworthy side of ``threshold`` (None: all)."""
    if threshold is None:
        return tf.ones_like(score, tf.bool)
    if HIGHER_IS_TRUST[name]:
        return score < float(threshold)
    return score > float(threshold)


def output_keys(stats: TrustStatistics | None, *, names: bool = True) -> list[str]:
    """The names :func:`trust_outputs` returns (with the same ``names``), in order."""
    keys = list(LOGIT_SCORES)
    if stats is None:
        return keys
    keys += list(FEATURE_SCORES)
    if stats.selection is not None:
        if stats.selection.get("ood_score"):
            keys.append(OUT_OF_DISTRIBUTION)
        keys.append(REFERRED)
    if stats.backoff is not None:
        keys += [PREDICTED_NODE if names else PREDICTED_NODE_ID, PREDICTED_NODE_PROBABILITY]
    return keys


# ----------------------------------------------------------------- storage
def model_fingerprint(path: str) -> str:
    """sha256 of a model file: trust statistics fitted on another model are stale."""
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def save(model_dir: str, stats: TrustStatistics) -> None:
    """Writes ``trust_features.npz`` then ``trust.json`` (each whole or not at all)."""
    from leukemia_tf import rundir

    buffer = io.BytesIO()
    np.savez(buffer, class_means=stats.class_means, precision=stats.precision, bank=stats.bank)
    path = rundir.join(model_dir, FEATURES_FILE)
    tmp = rundir._temporary(path)
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(buffer.getvalue())
    rundir._commit(tmp, path)
    record = {
        **stats.record,
        "knn_k": stats.knn_k,
        "mean_classes": stats.mean_classes,
        "feature_dim": stats.dim,
        "bank_size": int(len(stats.bank)),
        "selection": stats.selection,
        "backoff": stats.backoff,
    }
    rundir.write_json(rundir.join(model_dir, TRUST_FILE), record)


def load(model_dir: str, model_path: str | None = None) -> TrustStatistics | None:
    """The run's trust statistics, or ``None`` when never fitted.

    Args:
      model_dir: the run directory.
      model_path: the model file in use; when given, statistics fitted on a
        different file are refused.

    Raises:
      TrustNotFittedError: the statistics were fitted on another model file
        (the run was resumed or retrained since), naming the refit command.
    """
    from leukemia_tf import rundir

    record = rundir.read_json(rundir.join(model_dir, TRUST_FILE))
    if record is None:
        return None
    features_path = rundir.join(model_dir, FEATURES_FILE)
    if not tf.io.gfile.exists(features_path):
        raise TrustNotFittedError(
            f"{features_path} is missing (trust.json is there): refit with {fit_command(model_dir)}"
        )
    if model_path is not None and record.get("model_sha256"):
        if rundir.basename(model_path) == record.get("model_file"):
            if model_fingerprint(model_path) != record["model_sha256"]:
                raise TrustNotFittedError(
                    f"the trust statistics in {rundir.join(model_dir, TRUST_FILE)} were fitted "
                    f"on an earlier {record['model_file']} (the run changed since): refit with "
                    f"{fit_command(model_dir)}"
                )
        else:
            return None
    with tf.io.gfile.GFile(features_path, "rb") as f:
        arrays = np.load(io.BytesIO(f.read()))
        arrays = {k: arrays[k] for k in arrays.files}
    extra = {
        k: v
        for k, v in record.items()
        if k not in ("knn_k", "mean_classes", "feature_dim", "bank_size", "selection", "backoff")
    }
    return TrustStatistics(
        class_means=arrays["class_means"],
        precision=arrays["precision"],
        bank=arrays["bank"],
        knn_k=int(record["knn_k"]),
        mean_classes=list(record["mean_classes"]),
        selection=record.get("selection"),
        backoff=record.get("backoff"),
        record=extra,
    )
