r"""Saves a contact sheet of the SYNTHETIC leukemia set: one row per class.

Draws the cells straight from the generator (no TFDS build needed), picking
cells from every patient of each class in turn, so a row shows the spread of
patients, slides and stains. Each tile is labelled with the drawn cell type.

Example::

  python tools/show_synthetic.py --out=/tmp/synthetic.png --per_class=10 --zoom=2
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from absl import flags
from PIL import Image, ImageDraw

from leukemia_tf import cli
from tfds_builders.leukemia_synthetic import leukemia_synthetic_dataset_builder as synthetic

_OUT = flags.DEFINE_string("out", "synthetic_contact_sheet.png", "Where to write the PNG.")
_CONFIG = flags.DEFINE_enum(
    "config",
    "default",
    [c.name for c in synthetic.Builder.BUILDER_CONFIGS],
    "Which config of leukemia_synthetic to draw.",
)
_PER_CLASS = flags.DEFINE_integer("per_class", 10, "Images per class (row).", lower_bound=1)
_ZOOM = flags.DEFINE_integer(
    "zoom", 2, "Enlarge each tile this many times (nearest).", lower_bound=1
)
_LABELS = flags.DEFINE_bool("labels", True, "Write the cell type under each tile.")


def pick(
    cells: Sequence[synthetic.PlannedCell], per_class: int
) -> dict[str, list[synthetic.PlannedCell]]:
    """Up to ``per_class`` cells of each class, taken from its patients in turn.

    Args:
      cells: the plan of a config.
      per_class: how many per class.

    Returns:
      ``{class name: cells}`` in :data:`synthetic.CLASS_NAMES` order.
    """
    out = {}
    for name in synthetic.CLASS_NAMES:
        by_patient: dict[str, list[synthetic.PlannedCell]] = {}
        for cell in cells:
            if cell.diagnosis == name:
                by_patient.setdefault(cell.patient_id, []).append(cell)
        interleaved = [
            c for group in itertools.zip_longest(*by_patient.values()) for c in group if c
        ]
        out[name] = interleaved[:per_class]
    return out


def contact_sheet(
    config_name: str = "default", per_class: int = 10, zoom: int = 2, labels: bool = True
) -> Image.Image:
    """Draws the contact sheet.

    Args:
      config_name: a config of the synthetic builder.
      per_class: images per row.
      zoom: integer enlargement of each tile.
      labels: write each tile's cell type under it.

    Returns:
      The sheet as an RGB image.
    """
    config = next(c for c in synthetic.Builder.BUILDER_CONFIGS if c.name == config_name)
    size = config.image_size * zoom
    label_h = 12 if labels else 0
    left = 70
    rows = pick(synthetic.plan(config), per_class)
    sheet = Image.new(
        "RGB", (left + per_class * size, len(rows) * (size + label_h)), (255, 255, 255)
    )
    draw = ImageDraw.Draw(sheet)
    for row, (name, cells) in enumerate(rows.items()):
        top = row * (size + label_h)
        draw.text((4, top + size // 2 - 6), name, fill=(0, 0, 0))
        for col, cell in enumerate(cells):
            tile = Image.fromarray(synthetic.draw(cell, config.image_size))
            tile = tile.resize((size, size), Image.NEAREST)
            sheet.paste(tile, (left + col * size, top))
            if labels:
                draw.text(
                    (left + col * size + 2, top + size), cell.cell_type[:12], fill=(60, 60, 60)
                )
    return sheet


def main(argv: Sequence[str]) -> None:
    cli.check_no_args(argv)
    sheet = contact_sheet(_CONFIG.value, _PER_CLASS.value, _ZOOM.value, _LABELS.value)
    out = Path(_OUT.value).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"wrote {out} ({sheet.width}x{sheet.height}); SYNTHETIC images, not real cells")


if __name__ == "__main__":
    cli.run(main)
