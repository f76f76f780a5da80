"""Drawing SYNTHETIC blood-smear cells: caricatures, not real morphology.

Each image shows one white blood cell among red blood cells on a pale pink
smear background, drawn with numpy from a seeded ``numpy.random.Generator``.
The drawing is a transmission model: every stained structure (nucleus,
cytoplasm, granules, red cells, ...) is a density map times an absorbance
colour, and the image is ``light * exp(-sum of absorbances)``, so overlapping
structures darken the way stains do. Slides differ in stain strength, tint
and illumination; cells differ in position, rotation, size and shape.

The cell types follow, in caricature, what a hematologist looks at: the size
of the cell and of its nucleus, the nucleus's shape (round, indented,
band-shaped, segmented), the chromatin (fine or clumped), nucleoli, the
amount and colour of cytoplasm (basophilic blue or pale) and granules
(neutrophilic, eosinophilic, basophilic, azurophilic, Auer rods). See
:data:`CLASS_MIX` for which cell types make up a slide of each diagnosis.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable, Mapping

import numpy as np
from PIL import Image


def _absorbance(rgb: tuple[float, float, float]) -> np.ndarray:
    """Absorbance (optical density) of a stain that transmits ``rgb`` at density 1."""
    return -np.log(np.clip(np.asarray(rgb, np.float32), 1e-3, 1.0))


#: Stain of each drawn structure: the colour it transmits at density 1.
_STAIN_RGB: Mapping[str, tuple[float, float, float]] = {
    "plasma": (0.97, 0.93, 0.92),
    "rbc": (0.92, 0.66, 0.64),
    "nucleus": (0.34, 0.14, 0.52),
    "cyto_blue": (0.50, 0.64, 0.93),  # basophilic (RNA-rich) cytoplasm
    "cyto_grey": (0.74, 0.75, 0.90),  # blasts, monocytes: grey-blue
    "cyto_pale": (0.95, 0.86, 0.90),  # mature granulocytes: pale pink-lilac
    "granule_fine": (0.80, 0.60, 0.80),  # neutrophilic / specific granules
    "granule_azur": (0.70, 0.25, 0.50),  # azurophilic granules
    "granule_eo": (0.98, 0.52, 0.30),  # eosinophilic: orange
    "granule_baso": (0.26, 0.10, 0.38),  # basophilic: blue-black
    "auer": (0.62, 0.12, 0.38),  # Auer rod: red-purple
    "nucleolus": (0.72, 0.80, 0.97),  # pale blue
    "platelet": (0.55, 0.35, 0.70),
}
_STAINS = tuple(_STAIN_RGB)
_ABSORBANCE = np.stack([_absorbance(_STAIN_RGB[s]) for s in _STAINS])  # [stains, 3]
# Which stains are basic (hematoxylin-like: nuclei, RNA, basophil granules)
# and which acidic (eosin-like): a slide's stain strength scales each family.
_BASIC = np.array(
    [
        s in ("nucleus", "cyto_blue", "cyto_grey", "granule_baso", "nucleolus", "platelet")
        for s in _STAINS
    ]
)


@dataclasses.dataclass(frozen=True)
class SlideStyle:
    """How one slide looks: its staining, illumination, smear and microscope.

    Attributes:
      basic: strength of the basic (blue/purple) stains, 1 = nominal.
      acidic: strength of the acidic (pink/orange) stains.
      tint: per-channel multiplier of the basic stains' absorbance (hue shift).
      light: per-channel illumination (white balance), at most 1.
      rbc_density: red cells per unit area (thin or thick part of the smear).
      magnification: scale of everything drawn, 1 = nominal.
      noise: standard deviation of the camera noise, in 0-1 units.
    """

    basic: float = 1.0
    acidic: float = 1.0
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    light: tuple[float, float, float] = (1.0, 1.0, 1.0)
    rbc_density: float = 1.0
    magnification: float = 1.0
    noise: float = 0.012

    @classmethod
    def sample(cls, rng: np.random.Generator, around: SlideStyle | None = None) -> SlideStyle:
        """A random style; with ``around``, a small variation of it (a patient's next slide).

        The spread between patients is kept small on purpose: with a handful
        of patients per class, a patient-specific stain would let a model
        recognise the patient (and so the class) instead of the cells.
        :meth:`jitter` adds the larger, per-image variation.

        Args:
          rng: the random generator.
          around: the style to vary; ``None`` draws a new one.

        Returns:
          The style.
        """
        if around is None:
            return cls(
                basic=float(rng.uniform(0.92, 1.08)),
                acidic=float(rng.uniform(0.9, 1.1)),
                tint=tuple(float(t) for t in rng.uniform(0.96, 1.04, 3)),
                light=tuple(float(v) for v in 1.0 - rng.uniform(0.0, 0.03, 3)),
                rbc_density=float(rng.uniform(0.8, 1.2)),
                magnification=float(rng.uniform(0.96, 1.04)),
                noise=float(rng.uniform(0.008, 0.016)),
            )
        return cls(
            basic=around.basic * float(rng.uniform(0.97, 1.03)),
            acidic=around.acidic * float(rng.uniform(0.97, 1.03)),
            tint=tuple(float(t * rng.uniform(0.98, 1.02)) for t in around.tint),
            light=tuple(float(min(1.0, v * rng.uniform(0.99, 1.01))) for v in around.light),
            rbc_density=around.rbc_density * float(rng.uniform(0.9, 1.1)),
            magnification=around.magnification * float(rng.uniform(0.98, 1.02)),
            noise=around.noise,
        )

    def jitter(self, rng: np.random.Generator) -> SlideStyle:
        """This style varied for one image: uneven staining, focus, field of the smear.

        Args:
          rng: the random generator.

        Returns:
          The varied style.
        """
        return SlideStyle(
            basic=self.basic * float(rng.uniform(0.8, 1.2)),
            acidic=self.acidic * float(rng.uniform(0.75, 1.25)),
            tint=tuple(float(t * rng.uniform(0.9, 1.1)) for t in self.tint),
            light=tuple(float(v * (1.0 - rng.uniform(0.0, 0.06))) for v in self.light),
            rbc_density=self.rbc_density * float(rng.uniform(0.65, 1.35)),
            magnification=self.magnification * float(rng.uniform(0.94, 1.06)),
            noise=self.noise * float(rng.uniform(0.7, 1.3)),
        )


class _Canvas:
    """Density maps of every stain on a supersampled grid spanning [-1, 1]^2."""

    def __init__(self, size: int):
        self.size = size
        lin = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
        self.x, self.y = np.meshgrid(lin, lin)
        self.px = 2.0 / size  # one pixel in canvas units
        self.layers = np.zeros((len(_STAINS), size, size), np.float32)

    def add(self, stain: str, density: np.ndarray | float) -> None:
        self.layers[_STAINS.index(stain)] += density

    def get(self, stain: str) -> np.ndarray:
        return self.layers[_STAINS.index(stain)]

    # ----------------------------------------------------------------- shapes
    def window(self, x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice] | None:
        """Pixel slices (rows, columns) covering the canvas box ``[x0, x1] x [y0, y1]``."""
        c0 = max(int((x0 + 1.0) / self.px), 0)
        c1 = min(int(math.ceil((x1 + 1.0) / self.px)), self.size)
        r0 = max(int((y0 + 1.0) / self.px), 0)
        r1 = min(int(math.ceil((y1 + 1.0) / self.px)), self.size)
        if c1 <= c0 or r1 <= r0:
            return None
        return slice(r0, r1), slice(c0, c1)

    def blob(
        self,
        cx: float,
        cy: float,
        r: float,
        rng: np.random.Generator | None = None,
        roughness: float = 0.0,
        aspect: float = 1.0,
        angle: float = 0.0,
    ) -> np.ndarray:
        """A soft-edged (anti-aliased) ellipse with a wobbly outline, values in [0, 1].

        ``roughness`` is the amplitude of low harmonics of the radius (0: an
        exact ellipse); ``aspect`` > 1 squeezes it along its rotated y axis.
        """
        out = np.zeros((self.size, self.size), np.float32)
        # The harmonics below add at most 1.29 * roughness to the radius.
        reach = r * (1.0 + 1.3 * roughness) + 3 * self.px
        win = self.window(cx - reach, cy - reach, cx + reach, cy + reach)
        # Draw the harmonics even when the blob is off-canvas, so that the
        # random stream (and every later draw) does not depend on position.
        amps = [
            (k, roughness / k * rng.uniform(0.3, 1.0), rng.uniform(0, 6.3))
            for k in range(2, 6)
            if roughness and rng is not None
        ]
        if win is None:
            return out
        dx, dy = self.x[win] - cx, self.y[win] - cy
        c, s = math.cos(angle), math.sin(angle)
        xr = dx * c + dy * s
        yr = (-dx * s + dy * c) * aspect
        d = np.hypot(xr, yr)
        radius: np.ndarray | float = r
        if amps:
            theta = np.arctan2(yr, xr)
            wobble = np.zeros_like(d)
            for k, a, phase in amps:
                wobble += a * np.cos(k * theta + phase)
            radius = r * (1.0 + wobble)
        out[win] = np.clip((radius - d) / (1.5 * self.px) + 0.5, 0.0, 1.0)
        return out

    def tube(self, points: np.ndarray, widths: np.ndarray) -> np.ndarray:
        """Union of discs of radius ``widths[i]`` at ``points[i]`` (a curved, varying-width stroke)."""
        pad = float(widths.max()) + 3 * self.px
        lo = np.floor(((points.min(axis=0) - pad) + 1.0) / self.px).astype(int)
        hi = np.ceil(((points.max(axis=0) + pad) + 1.0) / self.px).astype(int)
        x0, y0 = np.clip(lo, 0, self.size)
        x1, y1 = np.clip(hi, 0, self.size)
        out = np.zeros((self.size, self.size), np.float32)
        if x1 <= x0 or y1 <= y0:
            return out
        xs, ys = self.x[y0:y1, x0:x1], self.y[y0:y1, x0:x1]
        d = np.hypot(xs[None] - points[:, 0, None, None], ys[None] - points[:, 1, None, None])
        margin = (widths[:, None, None] - d).max(axis=0)
        out[y0:y1, x0:x1] = np.clip(margin / (1.5 * self.px) + 0.5, 0.0, 1.0)
        return out

    def dots(self, points: np.ndarray, radius: float | np.ndarray) -> np.ndarray:
        """Small soft dots (granules) at ``points``; overlapping dots add up."""
        out = np.zeros((self.size, self.size), np.float32)
        radii = np.broadcast_to(np.asarray(radius, np.float32), (len(points),))
        for (px, py), r in zip(points, radii, strict=True):
            reach = r + 2 * self.px
            x0 = max(int((px - reach + 1.0) / self.px), 0)
            x1 = min(int((px + reach + 1.0) / self.px) + 1, self.size)
            y0 = max(int((py - reach + 1.0) / self.px), 0)
            y1 = min(int((py + reach + 1.0) / self.px) + 1, self.size)
            if x1 <= x0 or y1 <= y0:
                continue
            d = np.hypot(self.x[y0:y1, x0:x1] - px, self.y[y0:y1, x0:x1] - py)
            out[y0:y1, x0:x1] += np.clip((r - d) / (1.2 * self.px) + 0.5, 0.0, 1.0)
        return out

    def noise(self, rng: np.random.Generator, cells: int) -> np.ndarray:
        """Smooth noise with about ``cells`` features across the canvas, zero mean, unit std."""
        field = rng.standard_normal((cells, cells)).astype(np.float32)
        image = Image.fromarray(field, mode="F").resize((self.size, self.size), Image.BICUBIC)
        out = np.asarray(image, np.float32)
        return (out - out.mean()) / (out.std() + 1e-6)

    def render(self, style: SlideStyle, rng: np.random.Generator, out_size: int) -> np.ndarray:
        """Composes the layers into an 8-bit RGB image of ``out_size`` pixels."""
        scale = np.where(_BASIC, style.basic, style.acidic).astype(np.float32)
        absorbance = _ABSORBANCE * scale[:, None]
        absorbance[_BASIC] *= np.asarray(style.tint, np.float32)
        total = np.tensordot(self.layers, absorbance, axes=([0], [0]))  # [H, W, 3]
        rgb = np.asarray(style.light, np.float32) * np.exp(-total)
        factor = self.size // out_size
        rgb = rgb.reshape(out_size, factor, out_size, factor, 3).mean(axis=(1, 3))
        rgb = rgb + rng.normal(0.0, style.noise, rgb.shape).astype(np.float32)
        return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------- helpers
def _polar(cx: float, cy: float, rho: float, phi: float) -> tuple[float, float]:
    return cx + rho * math.cos(phi), cy + rho * math.sin(phi)


def _points_in_disc(rng: np.random.Generator, n: int, cx: float, cy: float, r: float) -> np.ndarray:
    rho = r * np.sqrt(rng.uniform(0, 1, n))
    phi = rng.uniform(0, 2 * np.pi, n)
    return np.stack([cx + rho * np.cos(phi), cy + rho * np.sin(phi)], axis=1).astype(np.float32)


def _points_where(
    rng: np.random.Generator, canvas: _Canvas, mask: np.ndarray, n: int
) -> np.ndarray:
    """``n`` random points (canvas units) where ``mask`` > 0.5."""
    ys, xs = np.nonzero(mask > 0.5)
    if len(xs) == 0 or n <= 0:
        return np.zeros((0, 2), np.float32)
    pick = rng.integers(0, len(xs), n)
    jitter = rng.uniform(-0.5, 0.5, (n, 2)) * canvas.px
    return (np.stack([canvas.x[0, xs[pick]], canvas.y[ys[pick], 0]], axis=1) + jitter).astype(
        np.float32
    )


@dataclasses.dataclass
class _Cell:
    """Where a cell is and how big: the frame its parts are drawn in."""

    cx: float
    cy: float
    radius: float
    angle: float


def _chromatin(
    canvas: _Canvas, rng: np.random.Generator, kind: str, level: float, radius: float
) -> np.ndarray:
    """Density multiplier of a nucleus's chromatin in a cell of ``radius``.

    ``fine``: even, delicate (blasts); ``coarse``: mature, moderately
    condensed; ``clumped``: dark blocks separated by pale lines (the
    "soccer ball" chromatin of CLL). Texture scales with the cell.
    """

    # Feature spacing as a fraction of the cell radius -> noise lattice size.
    def lattice(spacing: float) -> int:
        return max(4, round(2.0 / (spacing * radius)))

    if kind == "fine":
        return level * (1.0 + 0.12 * canvas.noise(rng, lattice(0.1)))
    if kind == "coarse":
        return level * (1.0 + 0.2 * canvas.noise(rng, lattice(0.2)))
    if kind == "clumped":
        field = canvas.noise(rng, lattice(0.3))
        blocks = np.clip(field * 2.0 + 0.5, 0.0, 1.0)
        return level * (0.4 + 0.85 * blocks)
    raise ValueError(f"unknown chromatin kind {kind!r}")


def _cytoplasm(canvas: _Canvas, cell_mask: np.ndarray, nucleus_mask: np.ndarray) -> np.ndarray:
    return np.clip(cell_mask - nucleus_mask, 0.0, 1.0)


def _nucleoli(
    canvas: _Canvas,
    rng: np.random.Generator,
    nucleus: np.ndarray,
    count: int,
    radius: float,
    centre: tuple[float, float],
    spread: float,
    strength: float,
) -> np.ndarray:
    """Pale nucleoli: returns the factor by which they thin the chromatin."""
    if count <= 0:
        return np.ones_like(nucleus)
    points = _points_in_disc(rng, count, centre[0], centre[1], spread)
    marks = np.clip(canvas.dots(points, radius * rng.uniform(0.8, 1.25, count)), 0, 1) * nucleus
    canvas.add("nucleolus", 0.9 * strength * marks)
    return 1.0 - strength * 0.75 * marks


def _segmented_nucleus(
    canvas: _Canvas, rng: np.random.Generator, cell: _Cell, lobes: int, lobe_size: float
) -> np.ndarray:
    """Lobes on an arc joined by thin chromatin strands (a mature granulocyte)."""
    r = cell.radius
    rho = r * rng.uniform(0.38, 0.5)
    step = rng.uniform(0.85, 1.2) * 2.2 * lobe_size / max(rho / r, 0.3)
    phis = cell.angle + (np.arange(lobes) - (lobes - 1) / 2) * step + rng.normal(0, 0.12, lobes)
    centres = np.array(
        [_polar(cell.cx, cell.cy, rho * rng.uniform(0.8, 1.15), p) for p in phis], np.float32
    )
    points, widths = [], []
    for i, (px, py) in enumerate(centres):
        points.append((px, py))
        widths.append(r * lobe_size * rng.uniform(0.85, 1.15))
        if i + 1 < lobes:
            qx, qy = centres[i + 1]
            for t in np.linspace(0.1, 0.9, 9):
                points.append((px + t * (qx - px), py + t * (qy - py)))
                widths.append(r * 0.055)
    return canvas.tube(np.array(points, np.float32), np.array(widths, np.float32))


def _band_nucleus(
    canvas: _Canvas, rng: np.random.Generator, cell: _Cell, span: float, width: float
) -> np.ndarray:
    """A curved sausage (C or U shape) of even width: band neutrophil, or a band-like bent nucleus."""
    r = cell.radius
    rho = r * rng.uniform(0.35, 0.48)
    phis = cell.angle + np.linspace(-span / 2, span / 2, 28)
    wobble = 1.0 + 0.08 * np.sin(np.linspace(0, rng.uniform(2, 5), 28) + rng.uniform(0, 6))
    points = np.array(
        [_polar(cell.cx, cell.cy, rho * w, p) for p, w in zip(phis, wobble, strict=True)],
        np.float32,
    )
    widths = np.full(len(points), r * width, np.float32) * rng.uniform(0.9, 1.1, len(points))
    return canvas.tube(points, widths.astype(np.float32))


def _indented_nucleus(
    canvas: _Canvas,
    rng: np.random.Generator,
    cell: _Cell,
    size: float,
    offset: float,
    notch: float,
) -> np.ndarray:
    """A round nucleus with a notch cut in one side (kidney / bean shape)."""
    r = cell.radius
    nx, ny = _polar(cell.cx, cell.cy, r * offset, cell.angle + math.pi)
    nucleus = canvas.blob(nx, ny, r * size, rng, roughness=0.05, aspect=rng.uniform(1.0, 1.2))
    # The notch opens towards the cell's centre of cytoplasm.
    cut_x, cut_y = _polar(nx, ny, r * size * (1.05 - 0.2 * notch), cell.angle)
    cut = canvas.blob(cut_x, cut_y, r * size * 0.55 * notch)
    return np.clip(nucleus - cut, 0.0, 1.0)


def _round_nucleus(
    canvas: _Canvas,
    rng: np.random.Generator,
    cell: _Cell,
    size: float,
    offset: float,
    roughness: float = 0.05,
) -> np.ndarray:
    r = cell.radius
    nx, ny = _polar(cell.cx, cell.cy, r * offset, cell.angle + math.pi)
    return canvas.blob(
        nx,
        ny,
        r * size,
        rng,
        roughness=roughness,
        aspect=rng.uniform(1.0, 1.15),
        angle=rng.uniform(0, 2 * np.pi),
    )


# ---------------------------------------------------------------- cell types
# Each draws one cell into the canvas and returns its mask (which hides the
# red cells under it). Sizes are in units of the red-cell radius ``u``.


def _granulocyte_body(canvas, rng, cell, roughness=0.04):
    return canvas.blob(cell.cx, cell.cy, cell.radius, rng, roughness=roughness)


def _neutrophil(canvas: _Canvas, rng: np.random.Generator, u: float, cell: _Cell) -> np.ndarray:
    cell.radius = u * rng.uniform(1.45, 1.7)
    body = _granulocyte_body(canvas, rng, cell)
    nucleus = _segmented_nucleus(canvas, rng, cell, int(rng.choice([3, 3, 4, 4, 5])), 0.23)
    canvas.add("nucleus", nucleus * _chromatin(canvas, rng, "coarse", 1.1, cell.radius))
    cyto = _cytoplasm(canvas, body, nucleus)
    canvas.add("cyto_pale", cyto)
    canvas.add("granule_fine", cyto * np.clip(0.35 + 0.25 * canvas.noise(rng, 40), 0, 1))
    return body


def _band(canvas: _Canvas, rng: np.random.Generator, u: float, cell: _Cell) -> np.ndarray:
    cell.radius = u * rng.uniform(1.45, 1.7)
    body = _granulocyte_body(canvas, rng, cell)
    nucleus = _band_nucleus(canvas, rng, cell, rng.uniform(2.3, 3.6), 0.17)
    canvas.add("nucleus", nucleus * _chromatin(canvas, rng, "coarse", 1.05, cell.radius))
    cyto = _cytoplasm(canvas, body, nucleus)
    canvas.add("cyto_pale", cyto)
    canvas.add("granule_fine", cyto * np.clip(0.4 + 0.25 * canvas.noise(rng, 40), 0, 1))
    return body


def _metamyelocyte(canvas: _Canvas, rng: np.random.Generator, u: float, cell: _Cell) -> np.ndarray:
    cell.radius = u * rng.uniform(1.55, 1.8)
    body = _granulocyte_body(canvas, rng, cell)
    nucleus = _indented_nucleus(canvas, rng, cell, 0.5, 0.2, rng.uniform(0.8, 1.1))
    canvas.add("nucleus", nucleus * _chromatin(canvas, rng, "coarse", 0.95, cell.radius))
    cyto = _cytoplasm(canvas, body, nucleus)
    canvas.add("cyto_pale", cyto)
    canvas.add("cyto_grey", 0.25 * cyto)
    canvas.add("granule_fine", cyto * np.clip(0.45 + 0.3 * canvas.noise(rng, 40), 0, 1))
    return body


def _myelocyte(canvas: _Canvas, rng: np.random.Generator, u: float, cell: _Cell) -> np.ndarray:
    cell.radius = u * rng.uniform(1.65, 2.0)
    body = _granulocyte_body(canvas, rng, cell)
    nucleus = _round_nucleus(canvas, rng, cell, rng.uniform(0.5, 0.58), 0.3)
    canvas.add("nucleus", nucleus * _chromatin(canvas, rng, "coarse", 0.85, cell.radius))
    cyto = _cytoplasm(canvas, body, nucleus)
    canvas.add("cyto_pale", cyto)
    canvas.add("cyto_grey", 0.45 * cyto)
    granules = _points_where(rng, canvas, cyto, int(rng.integers(25, 45)))
    canvas.add("granule_azur", 0.55 * np.clip(canvas.dots(granules, 1.3 * canvas.px), 0, 1) * cyto)
    canvas.add("granule_fine", cyto * np.clip(0.5 + 0.3 * canvas.noise(rng, 40), 0, 1))
    return body


def _eosinophil(canvas: _Canvas, rng: np.random.Generator, u: float, cell: _Cell) -> np.ndarray:
    cell.radius = u * rng.uniform(1.55, 1.8)
    body = _granulocyte_body(canvas, rng, cell)
    nucleus = _segmented_nucleus(canvas, rng, cell, 2, 0.27)
    canvas.add("nucleus", nucleus * _chromatin(canvas, rng, "coarse", 1.0, cell.radius))
    cyto = _cytoplasm(canvas, body, nucleus)
    canvas.add("cyto_pale", 0.5 * cyto)
    granules = _points_where(rng, canvas, cyto, int(rng.integers(70, 110)))
    canvas.add("granule_eo", 0.9 * np.clip(canvas.dots(granules, 1.7 * canvas.px), 0, 1.2) * cyto)
    return body


def _basophil(canvas: _Canvas, rng: np.random.Generator, u: float, cell: _Cell) -> np.ndarray:
    cell.radius = u * rng.uniform(1.3, 1.5)
    body = _granulocyte_body(canvas, rng, cell)
    nucleus = _segmented_nucleus(canvas, rng, cell, 2, 0.3)
    canvas.add("nucleus", 0.7 * nucleus)
    canvas.add("cyto_pale", _cytoplasm(canvas, body, nucleus))
    # Coarse dark granules lie over the nucleus too and hide it.
    granules = _points_where(rng, canvas, body, int(rng.integers(35, 60)))
    canvas.add(
        "granule_baso",
        1.1 * np.clip(canvas.dots(granules, rng.uniform(1.8, 2.6) * canvas.px), 0, 1) * body,
    )
    return body


def _lymphocyte(canvas: _Canvas, rng: np.random.Generator, u: float, cell: _Cell) -> np.ndarray:
    """Small mature lymphocyte: dense round nucleus, thin rim of pale blue cytoplasm."""
    cell.radius = u * rng.uniform(1.0, 1.2)
    body = canvas.blob(cell.cx, cell.cy, cell.radius, rng, roughness=0.04)
    nucleus = _round_nucleus(canvas, rng, cell, rng.uniform(0.8, 0.88), rng.uniform(0.04, 0.12))
    canvas.add("nucleus", nucleus * _chromatin(canvas, rng, "coarse", 1.15, cell.radius))
    canvas.add("cyto_blue", 0.55 * _cytoplasm(canvas, body, nucleus))
    return body


def _cll_lymphocyte(canvas: _Canvas, rng: np.random.Generator, u: float, cell: _Cell) -> np.ndarray:
    """CLL cell: small mature lymphocyte with block-like clumped ("soccer ball") chromatin."""
    cell.radius = u * rng.uniform(1.0, 1.25)
    body = canvas.blob(cell.cx, cell.cy, cell.radius, rng, roughness=0.05)
    nucleus = _round_nucleus(canvas, rng, cell, rng.uniform(0.82, 0.9), rng.uniform(0.03, 0.1))
    canvas.add("nucleus", nucleus * _chromatin(canvas, rng, "clumped", 1.1, cell.radius))
    canvas.add("cyto_blue", 0.45 * _cytoplasm(canvas, body, nucleus))
    return body


def _smudge(canvas: _Canvas, rng: np.random.Generator, u: float, cell: _Cell) -> np.ndarray:
    """Smudge cell: a ruptured lymphocyte, a pale ragged smear of nuclear material."""
    cell.radius = u * rng.uniform(1.25, 1.8)
    mask = canvas.blob(
        cell.cx,
        cell.cy,
        cell.radius,
        rng,
        roughness=0.55,
        aspect=rng.uniform(1.0, 1.6),
        angle=cell.angle,
    )
    # Streaks: noise stretched along one direction, like chromatin dragged by the smear.
    streak = np.asarray(
        Image.fromarray(rng.standard_normal((6, 40)).astype(np.float32), mode="F")
        .resize((canvas.size, canvas.size), Image.BILINEAR)
        .rotate(math.degrees(cell.angle), resample=Image.BILINEAR),
        np.float32,
    )
    # ... broken up by a finer, isotropic mottle (the lacy "basket" look).
    texture = 0.55 * streak + 0.45 * canvas.noise(rng, max(4, round(2.0 / (0.15 * cell.radius))))
    fuzz = np.clip(0.75 + 0.35 * canvas.noise(rng, 12), 0.3, 1.2)
    density = rng.uniform(0.22, 0.36) * np.clip(1.0 + 0.6 * texture, 0.15, 2.0)
    canvas.add("nucleus", mask * fuzz * density)
    return mask


def _reactive_lymphocyte(
    canvas: _Canvas, rng: np.random.Generator, u: float, cell: _Cell
) -> np.ndarray:
    """Reactive (Downey) lymphocyte: large, abundant blue cytoplasm darker at the edge."""
    cell.radius = u * rng.uniform(1.75, 2.25)
    body = canvas.blob(
        cell.cx, cell.cy, cell.radius, rng, roughness=0.22, aspect=rng.uniform(1.0, 1.25)
    )
    nucleus = _round_nucleus(canvas, rng, cell, rng.uniform(0.42, 0.52), rng.uniform(0.2, 0.35))
    canvas.add("nucleus", nucleus * _chromatin(canvas, rng, "coarse", 0.9, cell.radius))
    cyto = _cytoplasm(canvas, body, nucleus)
    # Peripheral basophilia: the cytoplasm deepens in colour towards the rim.
    d = np.hypot(canvas.x - cell.cx, canvas.y - cell.cy) / cell.radius
    canvas.add("cyto_blue", cyto * (0.45 + 0.75 * np.clip(d, 0, 1.2) ** 2))
    return body


def _lymphoblast(canvas: _Canvas, rng: np.random.Generator, u: float, cell: _Cell) -> np.ndarray:
    """ALL blast: large, nucleus nearly filling the cell, fine chromatin, scant blue rim."""
    cell.radius = u * rng.uniform(1.35, 1.8)
    body = canvas.blob(cell.cx, cell.cy, cell.radius, rng, roughness=0.05)
    if rng.uniform() < 0.3:  # a cleft / indented nucleus in some blasts
        nucleus = _indented_nucleus(canvas, rng, cell, 0.86, 0.05, rng.uniform(0.25, 0.45))
    else:
        nucleus = _round_nucleus(canvas, rng, cell, rng.uniform(0.84, 0.91), 0.05)
    chromatin = _chromatin(canvas, rng, "fine", 0.72, cell.radius)
    chromatin *= _nucleoli(
        canvas,
        rng,
        nucleus,
        int(rng.integers(0, 3)),
        0.09 * cell.radius,
        (cell.cx, cell.cy),
        0.35 * cell.radius,
        0.45,
    )
    canvas.add("nucleus", nucleus * chromatin)
    canvas.add("cyto_blue", 0.9 * _cytoplasm(canvas, body, nucleus))
    return body


def _myeloblast(canvas: _Canvas, rng: np.random.Generator, u: float, cell: _Cell) -> np.ndarray:
    """AML blast: large, fine pale chromatin, prominent nucleoli, grey-blue cytoplasm,
    some with azurophilic granules or an Auer rod."""
    cell.radius = u * rng.uniform(1.7, 2.2)
    body = canvas.blob(cell.cx, cell.cy, cell.radius, rng, roughness=0.06)
    offset = rng.uniform(0.1, 0.22)
    nucleus = _round_nucleus(canvas, rng, cell, rng.uniform(0.66, 0.76), offset)
    ncx, ncy = _polar(cell.cx, cell.cy, cell.radius * offset, cell.angle + math.pi)
    chromatin = _chromatin(canvas, rng, "fine", 0.62, cell.radius)
    chromatin *= _nucleoli(
        canvas,
        rng,
        nucleus,
        int(rng.integers(2, 5)),
        0.1 * cell.radius,
        (ncx, ncy),
        0.4 * cell.radius,
        0.85,
    )
    canvas.add("nucleus", nucleus * chromatin)
    cyto = _cytoplasm(canvas, body, nucleus)
    canvas.add("cyto_grey", 1.1 * cyto)
    canvas.add("cyto_blue", 0.25 * cyto)
    if rng.uniform() < 0.4:  # a few azurophilic granules
        granules = _points_where(rng, canvas, cyto, int(rng.integers(4, 12)))
        canvas.add("granule_azur", 0.9 * np.clip(canvas.dots(granules, 1.4 * canvas.px), 0, 1))
    if rng.uniform() < 0.4:  # Auer rod(s): thin needles in the cytoplasm
        for _ in range(1 if rng.uniform() < 0.75 else 2):
            centre = _points_where(rng, canvas, np.where(cyto > 0.99, 1.0, 0.0), 1)
            if len(centre) == 0:
                break
            phi = rng.uniform(0, np.pi)
            half = cell.radius * rng.uniform(0.18, 0.3)
            t = np.linspace(-half, half, 12)
            points = np.stack(
                [centre[0, 0] + t * math.cos(phi), centre[0, 1] + t * math.sin(phi)], axis=1
            ).astype(np.float32)
            rod = canvas.tube(points, np.full(len(points), 0.9 * canvas.px, np.float32))
            canvas.add("auer", 1.6 * rod)
    return body


def _monocyte(canvas: _Canvas, rng: np.random.Generator, u: float, cell: _Cell) -> np.ndarray:
    """Monocyte: large, folded nucleus with lacy chromatin, grey-blue cytoplasm, vacuoles."""
    cell.radius = u * rng.uniform(1.8, 2.1)
    body = canvas.blob(cell.cx, cell.cy, cell.radius, rng, roughness=0.1)
    nucleus = _indented_nucleus(canvas, rng, cell, 0.55, 0.15, rng.uniform(0.7, 1.1))
    canvas.add("nucleus", nucleus * _chromatin(canvas, rng, "coarse", 0.75, cell.radius))
    cyto = _cytoplasm(canvas, body, nucleus)
    vacuoles = _points_where(rng, canvas, cyto, int(rng.integers(0, 5)))
    holes = np.clip(canvas.dots(vacuoles, rng.uniform(1.5, 3.0) * canvas.px), 0, 1)
    canvas.add("cyto_grey", cyto * (1.0 - 0.8 * holes))
    return body


CellDrawer = Callable[[_Canvas, np.random.Generator, float, _Cell], np.ndarray]

#: Every drawable cell type.
CELL_TYPES: Mapping[str, CellDrawer] = {
    "neutrophil": _neutrophil,
    "band": _band,
    "metamyelocyte": _metamyelocyte,
    "myelocyte": _myelocyte,
    "eosinophil": _eosinophil,
    "basophil": _basophil,
    "lymphocyte": _lymphocyte,
    "cll_lymphocyte": _cll_lymphocyte,
    "smudge": _smudge,
    "reactive_lymphocyte": _reactive_lymphocyte,
    "lymphoblast": _lymphoblast,
    "myeloblast": _myeloblast,
    "monocyte": _monocyte,
}

#: Which cell types a slide of each diagnosis shows, and how often. Slides
#: share cell types (a neutrophil can come from any slide), so single cells
#: are ambiguous on purpose and slide-level aggregation has work to do.
CLASS_MIX: Mapping[str, Mapping[str, float]] = {
    "normal": {"neutrophil": 0.55, "lymphocyte": 0.3, "monocyte": 0.1, "eosinophil": 0.05},
    "reactive": {
        "reactive_lymphocyte": 0.7,
        "lymphocyte": 0.15,
        "neutrophil": 0.1,
        "monocyte": 0.05,
    },
    "ALL": {"lymphoblast": 0.85, "lymphocyte": 0.08, "neutrophil": 0.07},
    "AML": {"myeloblast": 0.85, "neutrophil": 0.1, "monocyte": 0.05},
    "CLL": {"cll_lymphocyte": 0.72, "smudge": 0.22, "neutrophil": 0.06},
    "CML": {
        "myelocyte": 0.25,
        "metamyelocyte": 0.15,
        "band": 0.15,
        "neutrophil": 0.25,
        "basophil": 0.1,
        "eosinophil": 0.07,
        "myeloblast": 0.03,
    },
}

#: Red-cell radius in canvas units (the canvas spans [-1, 1]) at zoom 1.
_RBC_RADIUS = 0.26


def _red_cells(
    canvas: _Canvas, rng: np.random.Generator, u: float, style: SlideStyle, cell_mask: np.ndarray
) -> None:
    """Red cells around (and hidden under) the white cell: pink discs with central pallor."""
    count = int(rng.poisson(14 * style.rbc_density * (_RBC_RADIUS / u) ** 2))
    placed: list[tuple[float, float, float]] = []
    density = np.zeros((canvas.size, canvas.size), np.float32)
    for _ in range(count * 4):
        if len(placed) >= count:
            break
        r = u * rng.uniform(0.88, 1.1)
        cx, cy = rng.uniform(-1.15, 1.15, 2)
        # Red cells touch or overlap a little, never pile up.
        if any(math.hypot(cx - x, cy - y) < 1.55 * max(r, q) for x, y, q in placed):
            continue
        placed.append((cx, cy, r))
        aspect = rng.uniform(1.0, 1.15)
        disc = canvas.blob(cx, cy, r, rng, roughness=0.03, aspect=aspect, angle=rng.uniform(0, 6.3))
        win = canvas.window(cx - 1.1 * r, cy - 1.1 * r, cx + 1.1 * r, cy + 1.1 * r)
        if win is None:
            continue
        d = np.hypot(canvas.x[win] - cx, canvas.y[win] - cy) / r
        density[win] += disc[win] * (0.45 + 0.55 * np.clip(d, 0, 1) ** 1.5)
    canvas.add("rbc", np.clip(density, 0, 1.6) * (1.0 - cell_mask))
    if rng.uniform() < 0.3:  # a few platelets
        points = _points_where(rng, canvas, 1.0 - cell_mask - density, int(rng.integers(1, 4)))
        canvas.add("platelet", 0.8 * np.clip(canvas.dots(points, 1.6 * canvas.px), 0, 1))


def draw_cell(
    cell_type: str, rng: np.random.Generator, style: SlideStyle, size: int = 64
) -> np.ndarray:
    """Draws one synthetic smear image centred (with jitter) on one white cell.

    Args:
      cell_type: a key of :data:`CELL_TYPES`.
      rng: the random generator (the image is a pure function of its state).
      style: the slide's staining, illumination and magnification.
      size: output height and width in pixels.

    Returns:
      ``[size, size, 3]`` uint8 RGB.
    """
    try:
        drawer = CELL_TYPES[cell_type]
    except KeyError:
        raise ValueError(f"unknown cell type {cell_type!r}; known: {sorted(CELL_TYPES)}") from None
    # Drawn at >= 128 px and averaged down: anti-aliased edges for small sizes.
    canvas = _Canvas(size * max(1, -(-128 // size)))
    style = style.jitter(rng)
    u = _RBC_RADIUS * style.magnification
    cell = _Cell(
        cx=float(rng.uniform(-0.12, 0.12)),
        cy=float(rng.uniform(-0.12, 0.12)),
        radius=u,
        angle=float(rng.uniform(0, 2 * np.pi)),
    )
    cell_mask = drawer(canvas, rng, u, cell)
    _red_cells(canvas, rng, u, style, cell_mask)
    canvas.add("plasma", 1.0)
    return canvas.render(style, rng, size)


def pick_cell_type(diagnosis: str, rng: np.random.Generator) -> str:
    """Draws a cell type for a slide of ``diagnosis`` from :data:`CLASS_MIX`.

    Args:
      diagnosis: a key of :data:`CLASS_MIX`.
      rng: the random generator.

    Returns:
      A key of :data:`CELL_TYPES`.
    """
    try:
        mix = CLASS_MIX[diagnosis]
    except KeyError:
        raise ValueError(f"unknown diagnosis {diagnosis!r}; known: {list(CLASS_MIX)}") from None
    types = list(mix)
    p = np.array([mix[t] for t in types], np.float64)
    return types[int(rng.choice(len(types), p=p / p.sum()))]


def encode_png(image: np.ndarray) -> bytes:
    """Encodes an RGB uint8 array as PNG (deterministic bytes for the same pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()
