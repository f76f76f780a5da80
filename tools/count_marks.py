r"""Counts the images that carry a burned-in mark (scale bar, text), per class folder.

Runs :func:`leukemia_tf.data.marks.count_marks` on every image below each
immediate subfolder of ``--images`` (a class folder, as the data sets and
``predict --images`` lay them out) and prints, per folder, how many images
carry a detected mark. A mark whose share differs between classes is a
shortcut a model can learn; train with ``--erase_marks`` or
``--augment_marks``.

Example::

  python tools/count_marks.py --images=../shared/data/all_taleqani/Original
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import app, flags

from leukemia_tf.data import images as images_lib
from leukemia_tf.data import marks

_IMAGES = flags.DEFINE_string("images", None, "Folder whose subfolders are the classes.")
_LIST = flags.DEFINE_integer("list", 0, "Also print up to this many flagged files per class.")
flags.mark_flag_as_required("images")


def main(argv: Sequence[str]) -> None:
    del argv
    root = _IMAGES.value
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not folders:
        folders = ["."]
    print(f"{'class':<24} {'images':>7} {'marked':>7} {'share':>7}")
    total = marked = 0
    for name in folders:
        files = images_lib.image_files_under(os.path.join(root, name))
        found = marks.count_marks(files)
        n, k = len(files), sum(found)
        total, marked = total + n, marked + k
        share = f"{100 * k / n:.1f}%" if n else "n/a"
        print(f"{name:<24} {n:>7} {k:>7} {share:>7}", flush=True)
        flagged = [path for path, flag in zip(files, found, strict=True) if flag]
        for path in flagged[: _LIST.value]:
            print(f"    {os.path.relpath(path, root)}")
    share = f"{100 * marked / total:.1f}%" if total else "n/a"
    print(f"{'all':<24} {total:>7} {marked:>7} {share:>7}")


if __name__ == "__main__":
    app.run(main)
