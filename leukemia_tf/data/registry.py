"""Registering the data-set builders with TFDS, without importing them by name.

Builders depend on this library (``tfds_builders`` imports ``leukemia_tf``);
the library never imports a builder package by an import statement. It finds
them through the setuptools entry-point group ``leukemia_tf.datasets``
instead: each entry point names a module whose import registers its builders
with TFDS. This package declares its own in ``setup.cfg``::

  [options.entry_points]
  leukemia_tf.datasets =
      tfds_builders = tfds_builders

and a third party adds its sets the same way, from its own package. A module
may list its builder names in a ``BUILDERS`` tuple; they are shown in
"unknown data set" messages.

A source checkout that was not pip-installed has no entry points; then, and
only then, the module ``tfds_builders`` is imported by name.
"""

from __future__ import annotations

import importlib
import importlib.metadata

from absl import logging

#: The entry-point group builder packages register under.
ENTRY_POINT_GROUP = "leukemia_tf.datasets"
#: Imported when no entry point is found (a source checkout, not pip-installed).
FALLBACK_MODULE = "tfds_builders"


def _load(entry_point: importlib.metadata.EntryPoint) -> object:
    try:
        return entry_point.load()
    except Exception as e:
        dist = getattr(entry_point, "dist", None)
        where = f" of the distribution {dist.name!r}" if dist is not None else ""
        raise ImportError(
            f"the entry point {entry_point.name} = {entry_point.value}{where} in the group "
            f"{ENTRY_POINT_GROUP!r} failed to load: {type(e).__name__}: {e}. Reinstall or "
            "remove that package."
        ) from e


def register_builders() -> tuple[str, ...]:
    """Imports every builder package, which registers its builders with TFDS.

    Call it before ``tfds.builder(name)`` for a name of this project (or of a
    package that declares the entry point). Importing is done once per
    process by Python, so calling again is cheap.

    Returns:
      The builder names the packages list in their ``BUILDERS`` (in load
      order, without repeats); empty if no builder package is installed
      (TFDS's own data sets still work).

    Raises:
      ImportError: an entry point names a module that fails to import; the
        message names the entry point and its distribution.
    """
    entry_points = sorted(
        importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name
    )
    if entry_points:
        modules = [_load(ep) for ep in entry_points]
    else:
        try:
            modules = [importlib.import_module(FALLBACK_MODULE)]
        except ModuleNotFoundError as e:
            if e.name != FALLBACK_MODULE:
                raise  # the package is there, but one of its imports is not
            logging.warning(
                "No data-set builders found: no entry point in the group %r and no module %r. "
                "Install this package (pip install -e .) to register them.",
                ENTRY_POINT_GROUP,
                FALLBACK_MODULE,
            )
            return ()
    names: dict[str, None] = {}
    for module in modules:
        names.update(dict.fromkeys(str(n) for n in getattr(module, "BUILDERS", ())))
    return tuple(names)
