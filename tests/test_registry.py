"""Tests of leukemia_tf.data.registry: builder packages found by entry point, else by name."""

from __future__ import annotations

import ast
import importlib.metadata
import logging
import sys
import types
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from leukemia_tf.data import registry

_LIBRARY = Path(__file__).resolve().parents[1] / "leukemia_tf"


def _entry_points(monkeypatch, *entry_points: importlib.metadata.EntryPoint) -> list[str]:
    """Makes ``importlib.metadata.entry_points`` return ``entry_points``; returns the groups asked."""
    asked = []

    def fake(**kwargs):
        asked.append(kwargs.get("group"))
        return [ep for ep in entry_points if ep.group == kwargs.get("group")]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    return asked


def _module(monkeypatch, name: str, builders: tuple[str, ...]) -> None:
    module = types.ModuleType(name)
    module.BUILDERS = builders
    monkeypatch.setitem(sys.modules, name, module)


def test_entry_points_are_loaded_and_the_fallback_is_not_used(monkeypatch):
    _module(monkeypatch, "site_a_builders", ("site_a", "shared"))
    _module(monkeypatch, "site_b_builders", ("shared", "site_b"))
    # The fallback would fail if it were tried.
    monkeypatch.setattr(registry, "FALLBACK_MODULE", "no_such_module_for_the_fallback")
    asked = _entry_points(
        monkeypatch,
        importlib.metadata.EntryPoint("b", "site_b_builders", registry.ENTRY_POINT_GROUP),
        importlib.metadata.EntryPoint("a", "site_a_builders", registry.ENTRY_POINT_GROUP),
        importlib.metadata.EntryPoint("other", "no_such_module", "another.group"),
    )
    assert registry.register_builders() == ("site_a", "shared", "site_b")
    assert asked == ["leukemia_tf.datasets"]


def test_a_broken_entry_point_is_named(monkeypatch):
    _entry_points(
        monkeypatch,
        importlib.metadata.EntryPoint(
            "broken", "no_such_builders_module", registry.ENTRY_POINT_GROUP
        ),
    )
    with pytest.raises(ImportError, match=r"entry point broken = no_such_builders_module"):
        registry.register_builders()


def test_without_entry_points_the_module_is_imported_by_name(monkeypatch):
    _entry_points(monkeypatch)
    import tfds_builders

    names = registry.register_builders()
    assert names == tuple(tfds_builders.BUILDERS)
    assert "leukemia_folder" in names
    assert tfds.builder_cls("pbc").name == "pbc"  # registered with TFDS


def test_without_any_builder_package_only_a_warning(monkeypatch, caplog):
    _entry_points(monkeypatch)
    monkeypatch.setattr(registry, "FALLBACK_MODULE", "no_such_builders_package")
    with caplog.at_level(logging.WARNING):
        assert registry.register_builders() == ()
    assert "no_such_builders_package" in caplog.text


def test_the_library_never_imports_the_builders():
    offending = []
    for path in sorted(_LIBRARY.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            if any(m == "tfds_builders" or m.startswith("tfds_builders.") for m in modules):
                offending.append(f"{path.relative_to(_LIBRARY.parent)}:{node.lineno}")
    assert not offending, f"leukemia_tf imports tfds_builders at {offending}"
