"""The run directory: one home for everything a run writes and reads back.

A training run's ``model_dir`` holds

* ``config.json`` and ``flags.txt``: the resolved :class:`TrainConfig`
  (``--flagfile=MODEL_DIR/flags.txt`` reproduces the run);
* ``labels.txt``: the class names, one per line;
* ``best.keras`` and ``last.keras``: the best and the last epoch's model;
* ``history.csv``: one row per finished epoch; ``logs/``: TensorBoard;
* ``backup/``: the checkpoint a killed run resumes from (deleted at the end);
* ``train_summary.json``: written last, when the run has finished;
* ``.lock``: held while a process trains into the directory (:class:`RunLock`);
* after ``leukemia_tf.evaluate``: ``calibration.json`` (``{"temperature": T}``)
  and ``eval_<split>/``.

A fold ensemble (``leukemia_tf.crossval --ensemble``) is a run directory of
the same layout without training files: ``config.json``, ``labels.txt``,
``best.keras`` (the averaged fold models, :mod:`leukemia_tf.models.ensemble`)
and ``ensemble.json`` (which folds, how averaged).

Training, evaluation, serving, prediction and tuning read and write it through
this module only. The directory may be local or remote (``gs://``; TF's
``ram://`` in the tests): every file goes through ``tf.io.gfile`` and paths are
joined as strings (:func:`join`), never with pathlib, which mangles URLs.

Every file is written whole or not at all: into a temporary name beside it,
then renamed over the target (:func:`write_text`, :func:`save_keras`), so a
run killed in the middle of a save leaves the previous file, never a partial
one. (On ``gs://`` a rename is a copy and a delete, but an object appears only
once its upload is complete, so a reader never sees a partial file there
either.)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import io
import json
import os
import signal
import socket
import tempfile

import keras
import numpy as np
import tensorflow as tf

from leukemia_tf.models import ensemble as ensemble_lib
from leukemia_tf.models import trust as trust_lib
from leukemia_tf.models.label_space import LabelSpace
from leukemia_tf.taxonomy import Taxonomy
from leukemia_tf.training import model_factory
from leukemia_tf.training.config import FINISHED_MARKER, ConfigError, TrainConfig

CONFIG_FILE = "config.json"
FLAGS_FILE = "flags.txt"
LABELS_FILE = "labels.txt"
BEST_MODEL = "best.keras"
LAST_MODEL = "last.keras"
HISTORY_CSV = "history.csv"
#: Written last, when the run has finished.
SUMMARY = FINISHED_MARKER
BACKUP_DIR = "backup"
LOGS_DIR = "logs"
CALIBRATION_FILE = "calibration.json"
#: The record of a fold ensemble (``leukemia_tf.crossval --ensemble``).
ENSEMBLE_FILE = "ensemble.json"
LOCK_FILE = ".lock"
#: Scratch space of the non-chief workers of a multi-worker run (deleted).
WORKERS_DIR = ".workers"
#: What ``--overwrite`` deletes before a run starts afresh.
RUN_OUTPUTS = (BEST_MODEL, LAST_MODEL, SUMMARY, HISTORY_CSV, BACKUP_DIR, WORKERS_DIR, LOGS_DIR)

#: Environment variable naming a fault point (:func:`fault_point`): the
#: process signals itself when it reaches it. For fault-injection tests and
#: ``tools/chaos_train.py``; never set in normal use.
FAULT_ENV = "LEUKEMIA_TF_FAULT"
_FAULT_COUNTS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Signals this process if ``$LEUKEMIA_TF_FAULT`` names ``name``.

    The variable reads ``POINT[@K][:SIGNAL]``: at the K-th time (1-based,
    default 1) the point is reached, the process sends itself SIGNAL (``KILL``
    by default, or ``TERM``). Points: ``save:<file name>`` between writing a
    file's temporary copy and renaming it, ``checkpoint`` before the backup
    checkpoint is written, ``step`` after every call of the training function.
    """
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    spec, sig = wanted, "KILL"
    head, _, tail = wanted.rpartition(":")
    if tail in ("KILL", "TERM"):
        spec, sig = head, tail
    point, _, nth = spec.partition("@")
    if point != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))


# ------------------------------------------------------- paths (local or remote)
def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL such as ``gs://bucket/run`` (or TF's in-process ``ram://``)."""
    return "://" in os.fspath(path)


def expand(path: str | os.PathLike) -> str:
    """``path`` as a string, ``~`` expanded when local."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.expanduser(path)


def join(model_dir: str | os.PathLike, *names: str) -> str:
    """``model_dir/name``: a plain string join for a URL, which pathlib would mangle."""
    model_dir = os.fspath(model_dir)
    if is_remote(model_dir):
        return "/".join([model_dir.rstrip("/"), *names])
    return os.path.join(model_dir, *names)


def basename(path: str | os.PathLike) -> str:
    """The last component of a local path or a URL (``gs://b/runs/x/`` -> ``x``)."""
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def remove(path: str) -> None:
    """Deletes a file or a directory tree (local or remote) if it exists."""
    if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
    elif tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)


def check_model_dir(model_dir: str | os.PathLike) -> str:
    """``model_dir`` as a string (``~`` expanded when local), if it exists.

    Raises:
      FileNotFoundError: naming ``--model_dir=...`` when it does not exist.
    """
    given = os.fspath(model_dir)
    path = expand(given)
    if not tf.io.gfile.isdir(path):
        raise FileNotFoundError(f"--model_dir={given!r} does not exist")
    return path


def remove_partial_writes(model_dir: str) -> list[str]:
    """Deletes the temporary files of writes cut short (a killed run); returns their paths."""
    if not tf.io.gfile.isdir(model_dir):
        return []
    stale = [
        join(model_dir, name)
        for name in tf.io.gfile.listdir(model_dir)
        if name.startswith(".") and ".tmp" in name and not name.endswith("/")
    ]
    for path in stale:
        remove(path)
    return stale


def is_finished(model_dir: str) -> bool:
    """True when ``model_dir`` holds a finished training run (its summary)."""
    return tf.io.gfile.exists(join(model_dir, SUMMARY))


# ------------------------------------------------------------- atomic writes
def _temporary(path: str) -> str:
    """A name beside ``path`` for writing it whole before the rename."""
    folder, name = path.rsplit("/", 1) if is_remote(path) else os.path.split(path)
    stem, ext = os.path.splitext(name)
    # Keras insists on the ``.keras`` suffix, so the marker goes before it.
    return join(folder, f".{stem}.tmp{os.getpid()}{ext}")


def _commit(tmp: str, path: str) -> None:
    fault_point(f"save:{basename(path)}")
    tf.io.gfile.rename(tmp, path, overwrite=True)


def write_text(path: str, text: str) -> None:
    """Writes ``text`` to a local or remote file, whole or not at all."""
    tmp = _temporary(path)
    remove(tmp)  # TF's ram:// appends on "w"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
    _commit(tmp, path)


@contextlib.contextmanager
def open_whole(path: str | os.PathLike, **kwargs):
    """Opens a local file for writing, whole or not at all (a temporary name, renamed at the end).

    ``kwargs`` go to :func:`open` (``newline``, ``encoding``); the file is
    replaced only when the ``with`` block ends without an exception.
    """
    path = os.fspath(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "w", **kwargs) as f:
            yield f
        _commit(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_text(path: str) -> str:
    with tf.io.gfile.GFile(path) as f:
        return f.read()


def write_json(path: str, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: str) -> dict | None:
    """A JSON file's content, or ``None`` when it does not exist."""
    if not tf.io.gfile.exists(path):
        return None
    return json.loads(read_text(path))


def save_keras(model: keras.Model, path: str) -> None:
    """Saves ``model`` as a ``.keras`` file, whole or not at all."""
    if is_remote(path):
        # Keras writes local files: save into a temporary folder, then upload.
        with tempfile.TemporaryDirectory(prefix="leukemia_tf_save_") as folder:
            local = os.path.join(folder, basename(path))
            model.save(local)
            tmp = _temporary(path)
            tf.io.gfile.copy(local, tmp, overwrite=True)
    else:
        tmp = _temporary(path)
        model.save(tmp)
    _commit(tmp, path)


def load_keras(path: str, **kwargs) -> keras.Model:
    """Loads a ``.keras`` file from a local path or a URL."""
    if not is_remote(path):
        return keras.models.load_model(path, **kwargs)
    # Keras reads local files: fetch a remote one into a temporary folder first.
    with tempfile.TemporaryDirectory(prefix="leukemia_tf_model_") as tmp:
        local = os.path.join(tmp, basename(path))
        tf.io.gfile.copy(path, local, overwrite=True)
        return keras.models.load_model(local, **kwargs)


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike, skip=()) -> list[str]:
    """Copies the files below ``src`` into ``dst`` (either local or remote).

    Files already in ``dst`` are replaced; others there are kept.

    Args:
      src: the folder to copy.
      dst: where to.
      skip: predicate ``skip(relative_folder_parts, name) -> bool``, or ``()``.

    Returns:
      The destination paths of the copied files.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    copied = []
    for folder, _, files in tf.io.gfile.walk(src):
        # walk() yields folders as ``src`` + the relative part.
        parts = [p for p in folder[len(src) :].replace(os.sep, "/").split("/") if p]
        target = join(dst, *parts)
        tf.io.gfile.makedirs(target)
        for name in files:
            if skip and skip(parts, name):
                continue
            out = join(target, name)
            remove(out)  # TF's ram:// appends to an existing file
            tf.io.gfile.copy(join(folder, name), out, overwrite=True)
            copied.append(out)
    return copied


# ------------------------------------------------------------------ config
def write_config(model_dir: str, config: TrainConfig) -> None:
    """Writes ``config.json`` and ``flags.txt`` (the flags that reproduce the run)."""
    tf.io.gfile.makedirs(model_dir)
    write_json(join(model_dir, CONFIG_FILE), config.to_dict())
    write_text(
        join(model_dir, FLAGS_FILE),
        "# Resolved configuration of this run. Reproduce it with:\n"
        f"#   python -m leukemia_tf.train --flagfile={join(model_dir, FLAGS_FILE)}\n"
        + config.to_flagfile(),
    )


def read_config(model_dir: str | os.PathLike) -> TrainConfig:
    """The :class:`TrainConfig` a training run wrote into ``model_dir``."""
    model_dir = expand(model_dir)
    path = join(model_dir, CONFIG_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} not found: is {model_dir} a leukemia_tf model_dir?")
    return TrainConfig.from_dict(json.loads(read_text(path)))


def write_labels(model_dir: str, class_names) -> None:
    write_text(join(model_dir, LABELS_FILE), "\n".join(class_names) + "\n")


def read_labels(model_dir: str) -> list[str]:
    path = join(model_dir, LABELS_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} not found: is {model_dir} a leukemia_tf model_dir?")
    return [line for line in read_text(path).splitlines() if line]


# ----------------------------------------------------------------- history
def read_history(model_dir: str, upto_epoch: int | None = None) -> list[dict]:
    """The rows of ``history.csv`` (empty if none), those before ``upto_epoch`` if given."""
    path = join(model_dir, HISTORY_CSV)
    if not tf.io.gfile.exists(path):
        return []
    rows = [
        {k: int(v) if k == "epoch" else float(v) for k, v in row.items()}
        for row in csv.DictReader(io.StringIO(read_text(path)))
    ]
    return rows if upto_epoch is None else [r for r in rows if r["epoch"] < upto_epoch]


def write_history(model_dir: str, rows: list[dict]) -> None:
    """Writes ``history.csv``, whole or not at all."""
    if not rows:
        return
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(join(model_dir, HISTORY_CSV), out.getvalue())


# -------------------------------------------------------------------- lock
class RunLockedError(ConfigError):
    """Another process is training into the same ``model_dir``."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


class RunLock:
    """``model_dir/.lock``: one training process per run directory.

    The lock file names its holder (pid, host, start time). A lock whose
    holder ran on this host and is gone (its pid is dead) is stale and taken
    over with a warning; a holder on another host cannot be checked from
    here, so the message says to delete the file once that process is known
    to be gone. On a local disk the file is created atomically (``O_EXCL``),
    so of two processes started at once exactly one wins. On ``gs://`` and
    other remote file systems ``tf.io.gfile`` has no exclusive create: the lock
    is checked, written and read back, which refuses any run started while
    another holds the directory, but two runs started within the same second
    may both pass; start remote runs one at a time.
    """

    def __init__(self, model_dir: str):
        self.path = join(model_dir, LOCK_FILE)
        self.model_dir = model_dir
        self._token = f"{socket.gethostname()}:{os.getpid()}:{id(self)}"

    def _holder(self) -> dict:
        try:
            return json.loads(read_text(self.path))
        except (tf.errors.NotFoundError, json.JSONDecodeError, FileNotFoundError):
            return {}

    def _stale(self, holder: dict) -> bool:
        if not holder:
            return True  # unreadable: a write cut short
        if holder.get("host") != socket.gethostname():
            return False
        pid = int(holder.get("pid", -1))
        return pid != os.getpid() and not _pid_alive(pid)

    def _refuse(self, holder: dict) -> RunLockedError:
        where = "this host" if holder.get("host") == socket.gethostname() else holder.get("host")
        return RunLockedError(
            f"--model_dir={self.model_dir!r} is in use by another training process (pid "
            f"{holder.get('pid')} on {where}, since {holder.get('since')}). Wait for it to "
            f"finish or choose another --model_dir; if that process is gone, delete {self.path}"
        )

    def acquire(self) -> RunLock:
        tf.io.gfile.makedirs(self.model_dir)
        info = json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": datetime.datetime.now().isoformat(timespec="seconds"),
                "token": self._token,
            }
        )
        for _ in range(2):
            if not is_remote(self.path):
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    pass
                else:
                    with os.fdopen(fd, "w") as f:
                        f.write(info)
                    return self
            elif not tf.io.gfile.exists(self.path):
                write_text(self.path, info)
                if self._holder().get("token") == self._token:
                    return self
            holder = self._holder()
            if not self._stale(holder):
                raise self._refuse(holder)
            print(
                f"Warning: removing the stale lock {self.path} (pid {holder.get('pid')} on this "
                "host is gone)."
            )
            remove(self.path)
        raise self._refuse(self._holder())

    def release(self) -> None:
        if self._holder().get("token") == self._token:
            remove(self.path)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------- calibration
def calibration_path(model_dir: str | os.PathLike) -> str:
    """Where :func:`write_temperature` stores the fitted temperature."""
    return join(model_dir, CALIBRATION_FILE)


def check_calibration(model_dir: str | os.PathLike) -> str:
    """The calibration file's path, for ``--apply_temperature``.

    Raises:
      FileNotFoundError: no temperature fitted yet (``leukemia_tf.evaluate`` fits it).
    """
    path = calibration_path(model_dir)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"--apply_temperature: {path} not found; fit a temperature first "
            f"(python -m leukemia_tf.evaluate --model_dir={os.fspath(model_dir)}) or leave "
            "--apply_temperature out"
        )
    return path


def read_temperature(model_dir: str | os.PathLike) -> float:
    data = read_json(calibration_path(model_dir))
    return 1.0 if data is None else float(data["temperature"])


def write_temperature(model_dir: str | os.PathLike, temperature: float, **extra) -> None:
    write_json(calibration_path(model_dir), {"temperature": float(temperature), **extra})


def load_trained_model(
    model_dir: str | os.PathLike,
    which: str = "best",
    float32: bool = True,
    tta: bool = False,
    trust: bool = True,
) -> TrainedModel:
    """Loads a trained model from ``model_dir``.

    Args:
      model_dir: the training run's output directory (local or ``gs://``).
      which: ``"best"`` or ``"last"``, or a path to a ``.keras`` file.
      float32: rebuild the model under the float32 policy (whatever precision
        it was trained in) and copy the weights: what evaluation and export use.
      tta: predict with test-time augmentation (:attr:`TrainedModel.tta`).
      trust: load the run's trust statistics (:attr:`TrainedModel.trust`);
        False when about to (re)fit them.

    Raises:
      FileNotFoundError: ``model_dir`` is not a finished or checkpointed run.
      trust.TrustNotFittedError: the trust statistics were fitted on an
        earlier version of the model file (naming the command that refits them).
    """
    model_dir = check_model_dir(model_dir)
    config = read_config(model_dir)
    which = os.fspath(which)
    path = which if which.endswith(".keras") else join(model_dir, f"{which}.keras")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"{path} not found: train first (python -m leukemia_tf.train --model_dir={model_dir})"
        )
    class_names = read_labels(model_dir)
    taxonomy = model_factory.taxonomy_for(config)
    loaded = load_keras(path)
    model = loaded
    ensemble = ensemble_lib.is_ensemble(loaded)
    # An ensemble is built and saved under the float32 policy (from its fold
    # models' float32 rebuilds): nothing to rebuild.
    if float32 and not ensemble:
        with model_factory.float32_policy():
            model = model_factory.build_model(
                config,
                len(class_names),
                taxonomy,
                weights="none",
                knn_bank_size=model_factory.knn_bank_size(loaded),
            )
        model.set_weights(loaded.get_weights())
    return TrainedModel(
        model_dir=model_dir,
        config=config,
        model=model,
        label_space=LabelSpace(class_names, config.head, taxonomy),
        taxonomy=taxonomy,
        temperature=read_temperature(model_dir),
        tta=tta,
        trust=trust_lib.load(model_dir, path) if trust else None,
        ensemble=(read_json(join(model_dir, ENSEMBLE_FILE)) or {}) if ensemble else None,
    )


# ------------------------------------------------------------- trained models
@dataclasses.dataclass
class TrainedModel:
    """A trained model with everything needed to read its predictions."""

    model_dir: str  # local path or URL (gs://)
    config: TrainConfig
    model: keras.Model
    label_space: LabelSpace
    taxonomy: Taxonomy | None
    temperature: float
    #: Test-time augmentation: average the logits over the 8 symmetries of the
    #: square (:func:`d4_views`). A blood cell has no orientation, so every
    #: view is as valid as the original; it costs 8x the inference time.
    tta: bool = False
    #: The trust statistics fitted for this model file (:mod:`leukemia_tf.models.trust`);
    #: ``None`` when never fitted.
    trust: trust_lib.TrustStatistics | None = None
    #: A fold ensemble's record (``ensemble.json``: folds, averaging); ``None``
    #: for a single model. An ensemble has no trust statistics.
    ensemble: dict | None = None
    _with_features: keras.Model | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def class_names(self) -> list[str]:
        return self.label_space.class_names

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def outputs(self, images, batch_size: int = 64, features: bool = False) -> dict:
        """The model's raw outputs (numpy dict) for uint8/float ``[N, S, S, 3]`` images.

        With ``features``, also the pooled backbone features (``trust.FEATURES``).
        """
        images = np.asarray(images)
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = tf.cast(images[start : start + batch_size], tf.float32)
            chunks.append({k: v.numpy() for k, v in self.forward(batch, features).items()})
        if not chunks:
            raise ValueError("no images given")
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def forward(self, pixels: tf.Tensor, features: bool = False) -> dict:
        """The model's outputs for float ``[B, S, S, 3]`` pixels (0-255), with TTA if set.

        With :attr:`tta`, every output (the flat logits, or each level's
        logits) is the mean over the 8 views of the same batch, run as one
        ``[8B, S, S, 3]`` batch.

        Args:
          pixels: the batch.
          features: also return the pooled backbone features under
            ``trust.FEATURES`` (the mean over the views with TTA).
        """
        model = self.model
        if features:
            if self._with_features is None:
                self._with_features = trust_lib.with_features(self.model)
            model = self._with_features
        if not self.tta:
            return model(pixels, training=False)
        views = d4_views(pixels)
        batch = tf.shape(pixels)[0]
        outputs = model(tf.concat(views, axis=0), training=False)
        return {
            k: tf.reduce_mean(
                tf.reshape(v, tf.concat([[len(views), batch], tf.shape(v)[1:]], 0)), 0
            )
            for k, v in outputs.items()
        }

    def probabilities(self, outputs: dict, calibrated: bool = False) -> np.ndarray:
        """Class probabilities ``[N, C]`` from :meth:`outputs` (optionally temperature-scaled)."""
        temperature = self.temperature if calibrated else 1.0
        return self.label_space.probabilities(outputs, temperature).numpy()


def d4_views(images: tf.Tensor) -> list[tf.Tensor]:
    """The 8 symmetries of the square (4 rotations, each also mirrored) of ``[B, S, S, C]``."""
    views = []
    for flipped in (images, tf.reverse(images, axis=[2])):
        for k in range(4):
            views.append(tf.image.rot90(flipped, k=k))
    return views
