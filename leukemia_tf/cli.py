"""What every binary of the package shares: one way to fail, one console.

Failing: a binary's ``main`` raises :class:`UserError` (or a subclass, such as
``ConfigError``) for anything the user can fix: a bad flag value, a data set
that is not built, a path that does not exist. :func:`run` turns it into ONE
line on stderr, ``error: <message>``, and exit status 2 (status 1 is left to
runs that worked but could not do everything, such as ``predict`` with
unreadable files). Flag parsing errors take the same form. Anything else is a
bug and keeps its traceback.

Console: by default a user sees the package's own output, Python warnings
and progress bars; TensorFlow's C++ log (CUDA probing, oneDNN notes), its
Python INFO lines and TFDS's chatter are hidden. ``--log_level=info`` (or
``debug``) brings them all back.

This module imports no TensorFlow: a binary imports it first, so that the
C++ log level is set before TensorFlow loads.
"""

from __future__ import annotations

import difflib
import logging as std_logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import NoReturn

from absl import app, flags, logging

#: Exit status of a user error (bad flag, missing data, bad path).
USER_ERROR_EXIT = 2

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "warning"

# TF_CPP_MIN_LOG_LEVEL per --log_level. 3 at 'warning' too: on a CPU-only host
# TensorFlow logs harmless C++ *errors* (failed cuInit, oneDNN uint8
# fallback); its real errors reach Python as exceptions anyway.
_TF_CPP_LEVEL = {"debug": "0", "info": "0", "warning": "3", "error": "3"}
_ABSL_LEVEL = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class UserError(Exception):
    """A mistake the user can fix; :func:`run` prints it as one line, without traceback.

    Args:
      message: what is wrong and, where it helps, the valid values; it should
        name the flag (``--backbone='x': ...``).
      exit_code: 2 (bad usage or input) unless the binary documents another.
    """

    def __init__(self, message: str, exit_code: int = USER_ERROR_EXIT):
        super().__init__(message)
        self.exit_code = exit_code


# ------------------------------------------------------------------- messages
def closest_first(value: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """``choices`` with the (at most ``n``) closest matches of ``value`` first, then the rest."""
    choices = list(choices)
    close = close_matches(value, choices, n=n)
    return close + [c for c in choices if c not in close]


def close_matches(value: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """At most ``n`` of ``choices`` that look like ``value`` (typos), best first."""
    return difflib.get_close_matches(value, list(choices), n=n, cutoff=0.6)


def one_line(message: object) -> str:
    """``message`` on one line (multi-line library messages are joined)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def check_no_args(argv: Sequence[str]) -> None:
    """Refuses positional arguments (every input is a flag)."""
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {list(argv[1:])}: every input is a --flag")


# ------------------------------------------------------------------- console
def _requested_log_level(argv: Sequence[str]) -> str:
    """``--log_level`` from the command line or its flagfiles, before flags are parsed.

    Needed because TensorFlow reads its C++ log level once, when it loads.
    """
    level = DEFAULT_LOG_LEVEL
    args = list(argv[1:])
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--log_level="):
            level = arg.split("=", 1)[1]
        elif arg == "--log_level" and i + 1 < len(args):
            level = args[i + 1]
        elif arg.startswith("--flagfile="):
            try:
                with open(os.path.expanduser(arg.split("=", 1)[1])) as f:
                    for line in f:
                        line = line.strip()
                        if line.startswith("--log_level="):
                            level = line.split("=", 1)[1]
            except OSError:
                pass  # absl reports the missing flagfile when it parses the flags
        i += 1
    return level if level in LOG_LEVELS else DEFAULT_LOG_LEVEL


def _set_tf_cpp_log_level(level: str) -> None:
    # An explicit TF_CPP_MIN_LOG_LEVEL in the environment wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", _TF_CPP_LEVEL[level])


def _import_tensorflow_quietly() -> None:
    """Imports TensorFlow with stderr (file descriptor 2) captured, dropping what it wrote.

    TensorFlow's native libraries log while they load (CUDA probing, oneDNN,
    CPU features) through a C++ logger that ignores TF_CPP_MIN_LOG_LEVEL.
    If the import fails, what was captured is replayed before the error.
    """
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class _DropLibraryWarnings(std_logging.Filter):
    """Drops TFDS's warnings (deprecations inside TFDS, dataset_info notes): not actionable here."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.ERROR or (
            f"{os.sep}tensorflow_datasets{os.sep}" not in record.pathname
        )


_library_filter = _DropLibraryWarnings()


def apply_log_level(level: str) -> None:
    """Sets absl's (and with it TensorFlow's and TFDS's) Python log level to ``level``.

    An explicit ``--verbosity`` (absl's own flag) is left as given.
    """
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(_ABSL_LEVEL[level])
    handler = logging.get_absl_handler()
    if level in ("warning", "error"):
        handler.addFilter(_library_filter)
    else:
        handler.removeFilter(_library_filter)


# ----------------------------------------------------------------------- run
def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Declares ``--log_level`` (idempotent; :func:`run` calls it, importing this module does not)."""
    if "log_level" in flag_values:
        return
    flags.DEFINE_enum(
        "log_level",
        DEFAULT_LOG_LEVEL,
        list(LOG_LEVELS),
        "Console detail. 'warning': the package's output, warnings and progress bars only; "
        "'info' / 'debug': also TensorFlow's C++ and Python logs and TFDS's messages; "
        "'error': errors only (and the package's output).",
        flag_values=flag_values,
    )


def fail(message: object, exit_code: int = USER_ERROR_EXIT) -> NoReturn:
    """Prints ``error: <message>`` (one line) to stderr and exits with ``exit_code``."""
    sys.stdout.flush()
    sys.stderr.write(f"error: {one_line(message)}\n")
    sys.stderr.flush()
    raise SystemExit(exit_code)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(e)


def _guarded(main: Callable[[list[str]], int | None]) -> Callable[[list[str]], int | None]:
    def wrapped(argv: list[str]) -> int | None:
        level = flags.FLAGS.log_level
        apply_log_level(level)
        if level in ("warning", "error"):
            _import_tensorflow_quietly()
        try:
            return main(argv)
        except UserError as e:
            fail(e, e.exit_code)
        except app.UsageError as e:  # raised by absl helpers and older code
            fail(e, USER_ERROR_EXIT)

    return wrapped


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """``absl.app.run(main)`` with the package's failure rule and console.

    Args:
      main: the binary's main; its return value is the exit status (None: 0).
      argv: the command line; default ``sys.argv``.
    """
    argv = list(sys.argv if argv is None else argv)
    define_flags()
    _set_tf_cpp_log_level(_requested_log_level(argv))
    app.run(_guarded(main), argv=argv, flags_parser=_parse_flags)
