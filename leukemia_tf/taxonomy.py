"""The label taxonomy: one tree of diagnoses, and each data set's labels on it.

The tree lives in a data file (``configs/taxonomy.yaml``). Levels are counted
from the top: level 0 holds the root's children (normal / reactive /
leukemia), level 1 their children (acute / chronic), and so on. A label is
encoded as one index per level, the index of its ancestor at that level among
*all* nodes of that level, and :data:`NOT_APPLICABLE` below the label's own
depth. The hierarchical head has one softmax per level; within a level the
softmax is taken over the siblings only (see :meth:`Taxonomy.level_parents`),
so a leaf's probability is the product of the conditional probabilities
along its path and predictions are consistent at every level.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import yaml

#: Marker in a level encoding: the label stops above this level.
NOT_APPLICABLE = -1

#: Name of the implicit root. It is not a class and may not be used as a label.
ROOT = "<root>"

_CONFIG_DIR_CANDIDATES = (
    Path(__file__).resolve().parent / "configs",
    Path(__file__).resolve().parent.parent / "configs",
)


class TaxonomyError(ValueError):
    """A taxonomy file or a label mapping is invalid."""


def default_taxonomy_path() -> Path:
    """Returns the path of the bundled ``taxonomy.yaml``."""
    for directory in _CONFIG_DIR_CANDIDATES:
        candidate = directory / "taxonomy.yaml"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "taxonomy.yaml not found in " + ", ".join(str(d) for d in _CONFIG_DIR_CANDIDATES)
    )


@dataclasses.dataclass(frozen=True)
class Node:
    """One node of the taxonomy tree."""

    name: str
    parent: str
    depth: int  # level index: 0 for the root's children
    children: tuple[str, ...]

    @property
    def is_leaf(self) -> bool:
        return not self.children


class Taxonomy:
    """A validated label tree plus the data sets' label mappings.

    Args:
      tree: nested mapping ``node -> children mapping`` (a leaf maps to an
        empty mapping or ``None``).
      datasets: ``dataset -> {native label -> node name or None}``. ``None``
        excludes a native label on purpose.
      source: where the definition came from, used in error messages.
    """

    def __init__(
        self,
        tree: Mapping,
        datasets: Mapping[str, Mapping[str, str | None]] | None = None,
        source: str = "<taxonomy>",
    ):
        self.source = source
        self._nodes: dict[str, Node] = {}
        if not isinstance(tree, Mapping) or not tree:
            raise TaxonomyError(f"{source}: 'tree' must be a non-empty mapping of node names")
        self._add_children(ROOT, tree, depth=0, ancestors=(ROOT,))
        self._root_children = tuple(str(k) for k in tree)
        self.num_levels = 1 + max(n.depth for n in self._nodes.values())
        self.levels: tuple[tuple[str, ...], ...] = tuple(
            tuple(n.name for n in self._nodes.values() if n.depth == level)
            for level in range(self.num_levels)
        )
        self._level_index = {name: i for level in self.levels for i, name in enumerate(level)}
        self.leaves: tuple[str, ...] = tuple(n.name for n in self._nodes.values() if n.is_leaf)
        self._datasets: dict[str, dict[str, str | None]] = {}
        for dataset, mapping in (datasets or {}).items():
            self.add_dataset_mapping(str(dataset), mapping)

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> Taxonomy:
        """Loads and validates a taxonomy YAML file (default: the bundled one)."""
        path = Path(path) if path is not None else default_taxonomy_path()
        if not path.is_file():
            raise FileNotFoundError(f"taxonomy file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise TaxonomyError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, Mapping) or "tree" not in data:
            raise TaxonomyError(f"{path}: expected a mapping with a 'tree' key")
        unknown = set(data) - {"tree", "datasets"}
        if unknown:
            raise TaxonomyError(f"{path}: unknown top-level keys {sorted(unknown)}")
        return cls(data["tree"], data.get("datasets") or {}, source=str(path))

    def _add_children(self, parent: str, children, depth: int, ancestors: tuple[str, ...]):
        if children is None:
            children = {}
        if not isinstance(children, Mapping):
            raise TaxonomyError(
                f"{self.source}: children of '{parent}' must be a mapping, got "
                f"{type(children).__name__}"
            )
        for raw_name, grandchildren in children.items():
            name = str(raw_name)
            if not name or name == ROOT:
                raise TaxonomyError(f"{self.source}: invalid node name {name!r} under '{parent}'")
            if name in ancestors:
                raise TaxonomyError(
                    f"{self.source}: cycle: '{name}' is its own ancestor "
                    f"({' -> '.join(ancestors[1:] + (name,))})"
                )
            if name in self._nodes:
                raise TaxonomyError(
                    f"{self.source}: duplicate node name '{name}' (under "
                    f"'{self._nodes[name].parent}' and under '{parent}')"
                )
            kids = tuple(str(k) for k in (grandchildren or {}))
            self._nodes[name] = Node(name=name, parent=parent, depth=depth, children=kids)
            self._add_children(name, grandchildren, depth + 1, ancestors + (name,))

    # ------------------------------------------------------------ tree queries
    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(self._nodes)

    def node(self, name: str) -> Node:
        try:
            return self._nodes[name]
        except KeyError:
            raise TaxonomyError(
                f"unknown taxonomy node '{name}' ({self.source}); known nodes: "
                f"{', '.join(self._nodes)}"
            ) from None

    def path(self, name: str) -> tuple[str, ...]:
        """Node names from the top level down to ``name`` (inclusive)."""
        node = self.node(name)
        out = [node.name]
        while node.parent != ROOT:
            node = self._nodes[node.parent]
            out.append(node.name)
        return tuple(reversed(out))

    def depth(self, name: str) -> int:
        return self.node(name).depth

    def children(self, name: str) -> tuple[str, ...]:
        if name == ROOT:
            return self._root_children
        return self.node(name).children

    def level_index(self, name: str) -> int:
        """Index of ``name`` among all nodes of its level."""
        self.node(name)
        return self._level_index[name]

    def level_membership(self, class_names: Iterable[str]) -> list[np.ndarray]:
        """Per level, ``[C, n_k]`` float32: 1 where class ``c`` is at or below node ``k``.

        A flat head's probabilities times a level's matrix are that level's node
        marginals (each node's probability is the sum over the classes under it);
        a class above the level has no node there (a zero row).
        """
        names = list(class_names)
        codes = np.zeros((len(names), self.num_levels), np.int32)
        for c, name in enumerate(names):
            codes[c] = self.encode(name)
        out = []
        for level, nodes in enumerate(self.levels):
            matrix = np.zeros((len(names), len(nodes)), np.float32)
            (rows,) = np.nonzero(codes[:, level] != NOT_APPLICABLE)
            matrix[rows, codes[rows, level]] = 1.0
            out.append(matrix)
        return out

    def level_parents(self, level: int) -> np.ndarray:
        """For each node of ``level``, the index of its parent in ``level - 1``.

        Level 0 gets all zeros (the implicit root). Nodes with the same parent
        are siblings: the head normalises its softmax over each sibling group.
        """
        if level == 0:
            return np.zeros(len(self.levels[0]), np.int32)
        return np.array(
            [self._level_index[self._nodes[n].parent] for n in self.levels[level]], np.int32
        )

    def encode(self, name: str) -> np.ndarray:
        """One index per level (int32), ``NOT_APPLICABLE`` below ``name``'s depth."""
        out = np.full(self.num_levels, NOT_APPLICABLE, np.int32)
        for level, ancestor in enumerate(self.path(name)):
            out[level] = self._level_index[ancestor]
        return out

    def decode(self, levels: Iterable[int]) -> str:
        """Inverse of :meth:`encode`: the deepest node named by a level encoding."""
        name = None
        for level, index in enumerate(levels):
            if index == NOT_APPLICABLE:
                break
            candidate = self.levels[level][int(index)]
            if name is not None and self._nodes[candidate].parent != name:
                raise TaxonomyError(f"inconsistent level encoding {list(levels)}")
            name = candidate
        if name is None:
            raise TaxonomyError("empty level encoding")
        return name

    def leaf_index(self, name: str) -> int:
        """Index of a leaf among :attr:`leaves`."""
        if name not in self.leaves:
            raise TaxonomyError(f"'{name}' is not a leaf; leaves: {', '.join(self.leaves)}")
        return self.leaves.index(name)

    def leaf_paths_matrix(self) -> np.ndarray:
        """``[num_leaves, num_levels]`` int32: each leaf's level encoding."""
        return np.stack([self.encode(leaf) for leaf in self.leaves])

    def leaves_under(self, name: str) -> tuple[str, ...]:
        """The leaves at or below ``name``."""
        return tuple(leaf for leaf in self.leaves if name in self.path(leaf))

    # -------------------------------------------------------- dataset mappings
    @property
    def datasets(self) -> tuple[str, ...]:
        return tuple(self._datasets)

    def add_dataset_mapping(self, dataset: str, mapping: Mapping[str, str | None]) -> None:
        """Registers (or replaces) ``dataset``'s native-label -> node mapping."""
        if not isinstance(mapping, Mapping):
            raise TaxonomyError(f"{self.source}: mapping of dataset '{dataset}' must be a mapping")
        clean: dict[str, str | None] = {}
        for native, node in mapping.items():
            if node is not None:
                node = str(node)
                if node not in self._nodes:
                    raise TaxonomyError(
                        f"{self.source}: dataset '{dataset}' maps label '{native}' to unknown "
                        f"node '{node}'; known nodes: {', '.join(self._nodes)}"
                    )
            clean[str(native)] = node
        self._datasets[dataset] = clean

    def dataset_mapping(self, dataset: str) -> dict[str, str | None]:
        try:
            return dict(self._datasets[dataset])
        except KeyError:
            raise TaxonomyError(
                f"no label mapping for dataset '{dataset}' in {self.source}; add one under "
                f"'datasets:' (known: {', '.join(self._datasets) or 'none'})"
            ) from None

    def map_labels(self, dataset: str, native_labels: Iterable[str]) -> list[str | None]:
        """Maps every native label of ``dataset`` to a node (``None`` = excluded).

        Raises:
          TaxonomyError: a native label has no entry in the mapping.
        """
        mapping = self.dataset_mapping(dataset)
        native_labels = [str(n) for n in native_labels]
        missing = [n for n in native_labels if n not in mapping]
        if missing:
            raise TaxonomyError(
                f"dataset '{dataset}': native labels {missing} are not mapped in {self.source}; "
                "map each to a taxonomy node, or to null to exclude it"
            )
        return [mapping[n] for n in native_labels]

    def __repr__(self) -> str:
        return (
            f"Taxonomy({self.source!r}, levels={[len(level) for level in self.levels]}, "
            f"leaves={len(self.leaves)})"
        )
