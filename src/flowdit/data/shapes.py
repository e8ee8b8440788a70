"""Captioned procedural scenes: 1-3 coloured shapes with a scene graph, masks and captions.

Everything is rendered from a seed with numpy and Pillow (no download), anti-aliased by
drawing every object's mask at ``SUPERSAMPLE`` (4x) the resolution and box-filtering it
down. The vocabulary (documented with RGB values in ``docs/shapes.md``):

- shapes (:data:`SHAPES`): circle, square, triangle (pointing up), star (five points, one
  up), ring (inner radius half the outer), cross (plus sign, arms a third of the size
  thick), diamond (square turned 45 degrees), semicircle (flat side down); fixed
  orientations.
- colours (:data:`COLOURS`): nine named RGB colours at least 110 apart in RGB (Euclidean),
  and at least 170 from the grey background (:data:`BACKGROUND_RGB`), so that a pixel's
  nearest named colour is unambiguous.
- sizes (:data:`SIZES`): an object's size is the larger side of its bounding box, in
  pixels: small 11-13 px, large 20-24 px at 64x64, scaled by ``min(H, W) / 64``.
- relations (:data:`RELATIONS`): ``left``, ``right``, ``above``, ``below`` (image axes:
  x to the right, y down). A stated relation ``(a, "left", b)`` is rendered with a's box
  wholly left of b's by a gap, and the horizontal offset of the centres at least twice the
  vertical one (so no other relation could be read off the picture).
- backgrounds: ``plain`` grey, or textured around the same grey: ``noise`` (smoothed noise,
  +-12 levels) and ``stripes`` (a sinusoid of random angle and period, +-9 levels); always
  far from every object colour.

A scene has 1-3 objects with distinct ``(colour, shape)`` pairs (so a caption's
"the red circle" names one object), boxes at least a gap apart (no overlap), and, for
2 or 3 objects, a chain of relations ``(0, r, 1)`` and ``(1, r', 2)``.

Splits: ``train`` is an endless stream (:func:`train_stream`); ``val`` and ``test`` are
fixed sets by seed (:func:`scene_set`); ``heldout`` holds only scenes with a held-out
composition (:data:`HELDOUT_PAIRS`, :data:`HELDOUT_RELATION`), which the other splits never
render. Scene ``i`` of a split and seed is always the same bytes, on any machine.

:func:`load_shapes` is the fixed-size in-memory :class:`~flowdit.data.base.ImageDataset`
behind ``build_dataset("shapes", ...)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from flowdit.data.base import ImageDataset
from flowdit.errors import DataError

__all__ = [
    "SHAPES", "COLOURS", "SIZES", "RELATIONS", "INVERSE_RELATION", "BACKGROUNDS",
    "BACKGROUND_RGB", "HELDOUT_PAIRS", "HELDOUT_RELATION", "SPLITS", "CLASS_NAMES",
    "SUPERSAMPLE", "ShapeObject", "SceneGraph", "ObjectSpec", "SceneSpec", "Scene",
    "ShapesBatch", "ShapesDataset", "size_scale", "size_range_px", "size_threshold_px",
    "min_gap_px", "object_bbox", "geometric_relation", "relation_holds", "sample_graph", "render",
    "captions", "scene_graph", "make_scene", "scene_set", "train_stream", "load_shapes", "class_index",
]

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "semicircle")

#: Named colours, RGB 0..255. Pairwise distances >= 110, >= 170 from the background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "orange": (255, 130, 0),
    "yellow": (250, 240, 0),
    "green": (0, 170, 0),
    "cyan": (0, 220, 230),
    "blue": (20, 40, 230),
    "magenta": (230, 0, 230),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
BACKGROUND_RGB = (128, 128, 128)
BACKGROUNDS = ("plain", "noise", "stripes")
SIZES = ("small", "large")
RELATIONS = ("left", "right", "above", "below")
INVERSE_RELATION = {"left": "right", "right": "left", "above": "below", "below": "above"}

#: (colour, shape) pairs never rendered outside the ``heldout`` split.
HELDOUT_PAIRS = (
    ("red", "star"), ("blue", "triangle"), ("green", "ring"),
    ("yellow", "cross"), ("magenta", "square"), ("cyan", "circle"),
)
#: A relation pattern never rendered outside ``heldout``: a square above a circle (read off
#: the pixels with :func:`geometric_relation`, whatever the caption says).
HELDOUT_RELATION = ("square", "above", "circle")

SPLITS = ("train", "val", "test", "heldout")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2, "heldout": 3}
#: Default number of scenes of :func:`load_shapes` per split.
DATASET_SIZES = {"train": 8000, "val": 1000, "test": 1000, "heldout": 1000}
#: ``load_shapes`` labels: index of the first object's ``"colour shape"`` in this list.
CLASS_NAMES = [f"{c} {s}" for c in COLOURS for s in SHAPES]

SUPERSAMPLE = 4
_SMALL_PX = (11.0, 13.0)
_LARGE_PX = (20.0, 24.0)
_GAP_PX = 3.0      # least distance between two objects' boxes (at 64x64)
_BORDER_PX = 2.0   # least distance between a box and the image edge (at 64x64)
_JUDGE_MARGIN_PX = 2.0


# ---------------------------------------------------------------- scene graph


@dataclass
class ShapeObject:
    """One object of a scene.

    ``centre`` is the centre of its bounding box ``(x, y)`` in pixels (x right, y down,
    pixel ``(row i, col j)`` covering ``[j, j + 1) x [i, i + 1)``); ``bbox`` is
    ``(x0, y0, x1, y1)``, floats; ``size_px`` is the larger side of the box.
    """

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]
    size_px: float
    bbox: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    @property
    def name(self) -> str:
        """``"colour shape"``, unique within a scene."""
        return f"{self.colour} {self.shape}"


@dataclass
class SceneGraph:
    """A scene: image size, objects, stated relations ``(i, relation, j)`` (object i is
    ``relation`` of object j), background kind and the seed of its texture."""

    height: int
    width: int
    objects: list[ShapeObject]
    relations: list[tuple[int, str, int]] = field(default_factory=list)
    background: str = "plain"
    texture_seed: int = 0

    def spec(self) -> "SceneSpec":
        """What a caption of this scene says: attributes and relations, no positions."""
        return SceneSpec([ObjectSpec(o.shape, o.colour, o.size) for o in self.objects],
                         list(self.relations))


@dataclass(frozen=True)
class ObjectSpec:
    """An object as a prompt names it; ``size`` may be None (not stated)."""

    shape: str
    colour: str
    size: str | None = None


@dataclass
class SceneSpec:
    """A scene as a prompt states it: objects and relations ``(i, relation, j)``."""

    objects: list[ObjectSpec]
    relations: list[tuple[int, str, int]] = field(default_factory=list)

    def canonical(self) -> "SceneSpec":
        """The same statement in one form: objects sorted by (colour, shape), relations
        written with ``left`` / ``above`` only (``a right b`` becomes ``b left a``), sorted."""
        order = sorted(range(len(self.objects)),
                       key=lambda i: (self.objects[i].colour, self.objects[i].shape, self.objects[i].size or ""))
        new = {old: k for k, old in enumerate(order)}
        rels = set()
        for i, r, j in self.relations:
            i, j = new[i], new[j]
            if r in ("right", "below"):
                i, r, j = j, INVERSE_RELATION[r], i
            rels.add((i, r, j))
        return SceneSpec([self.objects[i] for i in order], sorted(rels))


@dataclass
class Scene:
    """A rendered scene: image uint8 ``[3, H, W]``, instance masks bool ``[K, H, W]``
    (pixels at least half covered by object k), its graph and its captions."""

    image: np.ndarray
    masks: np.ndarray
    graph: SceneGraph
    captions: list[str]


@dataclass
class ShapesBatch:
    """A batch of scenes: images uint8 ``[B, 3, H, W]``, one caption per scene (drawn among
    its templates), every caption, graphs and masks (bool ``[K_b, H, W]`` each)."""

    images: torch.Tensor
    captions: list[str]
    all_captions: list[list[str]]
    graphs: list[SceneGraph]
    masks: list[np.ndarray]


def size_scale(height: int, width: int) -> float:
    """The factor sizes, gaps and margins are scaled by: ``min(H, W) / 64``."""
    return min(height, width) / 64.0


def size_range_px(size: str, height: int = 64, width: int = 64) -> tuple[float, float]:
    """The range of ``size_px`` of a ``"small"`` or ``"large"`` object at ``H x W``."""
    lo, hi = _SMALL_PX if size == "small" else _LARGE_PX
    s = size_scale(height, width)
    return lo * s, hi * s


def size_threshold_px(height: int = 64, width: int = 64) -> float:
    """The size (larger box side, pixels) that separates small from large at ``H x W``."""
    return math.sqrt(_SMALL_PX[1] * _LARGE_PX[0]) * size_scale(height, width)


def min_gap_px(height: int = 64, width: int = 64) -> float:
    """The least gap between two objects' boxes at ``H x W``."""
    return _GAP_PX * size_scale(height, width)


def geometric_relation(ca: Sequence[float], cb: Sequence[float], margin: float = 0.0) -> str | None:
    """The relation of a point ``ca = (x, y)`` to ``cb`` along the dominant axis of their
    offset (``"left"``: a is left of b), or None when that offset is below ``margin``."""
    dx, dy = cb[0] - ca[0], cb[1] - ca[1]
    if abs(dx) >= abs(dy):
        if abs(dx) < max(margin, 1e-9):
            return None
        return "left" if dx > 0 else "right"
    if abs(dy) < max(margin, 1e-9):
        return None
    return "above" if dy > 0 else "below"


def relation_holds(ca: Sequence[float], cb: Sequence[float], relation: str, margin: float = 0.0) -> bool:
    """Whether ``a relation b`` holds for centres ``ca``, ``cb`` (dominant axis, margin)."""
    return geometric_relation(ca, cb, margin) == relation


def _judge_margin(height: int, width: int) -> float:
    return _JUDGE_MARGIN_PX * size_scale(height, width)


def _has_heldout(objects: Sequence[ShapeObject], height: int, width: int) -> bool:
    """Whether a scene shows a held-out pair or the held-out relation pattern."""
    if any((o.colour, o.shape) in HELDOUT_PAIRS for o in objects):
        return True
    top, rel, bottom = HELDOUT_RELATION
    m = _judge_margin(height, width)
    for a in objects:
        for b in objects:
            if a is not b and a.shape == top and b.shape == bottom and \
                    geometric_relation(a.centre, b.centre, m) == rel:
                return True
    return False


# ---------------------------------------------------------------- sampling


def object_bbox(o: ShapeObject) -> tuple[float, float, float, float]:
    """The box ``(x0, y0, x1, y1)`` of an object from its shape, ``size_px`` and ``centre``."""
    w, h = _extent(o.shape, o.size_px)
    cx, cy = o.centre
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def _extent(shape: str, d: float) -> tuple[float, float]:
    """(width, height) of a shape of size ``d``."""
    if shape == "triangle":
        return d, d * math.sqrt(3) / 2
    if shape == "semicircle":
        return d, d / 2
    if shape == "star":
        pts = _star_unit()
        w, h = np.ptp(pts[:, 0]), np.ptp(pts[:, 1])
        return (d, d * h / w) if w >= h else (d * w / h, d)
    return d, d


def _stated_ok(a: ShapeObject, b: ShapeObject, rel: str, gap: float) -> bool:
    """A stated relation a-rel-b rendered with a margin: boxes apart along the axis by
    ``gap`` and the offset along that axis at least twice the other."""
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    dx, dy = b.centre[0] - a.centre[0], b.centre[1] - a.centre[1]
    if rel == "left":
        return ax1 + gap <= bx0 and abs(dx) >= 2 * abs(dy)
    if rel == "right":
        return bx1 + gap <= ax0 and abs(dx) >= 2 * abs(dy)
    if rel == "above":
        return ay1 + gap <= by0 and abs(dy) >= 2 * abs(dx)
    return by1 + gap <= ay0 and abs(dy) >= 2 * abs(dx)


def _apart(a: ShapeObject, b: ShapeObject, gap: float) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def _place(rng: np.random.Generator, objects: list[ShapeObject], relations, height, width,
           tries: int = 50) -> bool:
    """Set the objects' centres: object 0 uniformly, each later object on the stated side of
    the object it is related to (beyond the gap, its offset along that axis at least twice
    the other); redrawn until no two boxes are closer than the gap."""
    s = size_scale(height, width)
    gap, border = _GAP_PX * s, _BORDER_PX * s
    # anchor[j] = (k, side): object j lies on ``side`` of an earlier object k.
    anchor = {j: (i, INVERSE_RELATION[r]) for i, r, j in relations}
    for _ in range(tries):
        ok = True
        for j, o in enumerate(objects):
            w, h = _extent(o.shape, o.size_px)
            lo = [border + w / 2, border + h / 2]
            hi = [width - border - w / 2, height - border - h / 2]
            if hi[0] < lo[0] or hi[1] < lo[1]:
                return False
            if j not in anchor:
                o.centre = (float(rng.uniform(lo[0], hi[0])), float(rng.uniform(lo[1], hi[1])))
            else:
                a, side = objects[anchor[j][0]], anchor[j][1]
                ax = 0 if side in ("left", "right") else 1
                half = (w, h)[ax] / 2
                lo_m, hi_m = lo[ax], hi[ax]
                if side in ("right", "below"):
                    lo_m = max(lo_m, a.bbox[2 + ax] + gap + half)
                else:
                    hi_m = min(hi_m, a.bbox[ax] - gap - half)
                if hi_m < lo_m:
                    ok = False
                    break
                main = float(rng.uniform(lo_m, hi_m))
                spread = abs(main - a.centre[ax]) / 2
                lo_p, hi_p = max(lo[1 - ax], a.centre[1 - ax] - spread), min(hi[1 - ax], a.centre[1 - ax] + spread)
                if hi_p < lo_p:
                    ok = False
                    break
                perp = float(rng.uniform(lo_p, hi_p))
                o.centre = (main, perp) if ax == 0 else (perp, main)
            o.bbox = object_bbox(o)
        if not ok:
            continue
        if not all(_apart(a, b, gap) for k, a in enumerate(objects) for b in objects[k + 1:]):
            continue
        if all(_stated_ok(objects[i], objects[j], r, gap) for i, r, j in relations):
            return True
    return False


def sample_graph(rng: np.random.Generator, height: int = 64, width: int = 64, split: str = "train",
                 num_objects: int | None = None) -> SceneGraph:
    """Draw a scene graph (attributes, relations, positions, background) from ``rng``.

    Args:
        rng: the generator; the graph depends on nothing else.
        height, width: image size in pixels (each >= 32).
        split: ``"heldout"`` forces a held-out composition (half the scenes a held-out
            (colour, shape) pair as object 0, half a stated square-above-circle relation);
            every other split rejects scenes that show any held-out composition.
        num_objects: 1, 2 or 3; default uniform over them (2 or 3 for the relation pattern).

    Returns:
        the :class:`SceneGraph`, positions set so that every stated relation holds with a
        margin and no two objects are closer than the gap.
    """
    if split not in SPLITS:
        raise DataError(f"shapes: unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if height < 32 or width < 32:
        raise DataError(f"shapes: images must be at least 32x32, got {height}x{width}")
    colours = list(COLOURS)
    force_relation = split == "heldout" and rng.random() < 0.5
    k = num_objects if num_objects is not None else int(rng.integers(2 if force_relation else 1, 4))
    if force_relation and k < 2:
        force_relation = False
    # The object count and kind are drawn once, so that hard placements (three large
    # objects) keep their share; attributes and positions are redrawn until they fit.
    while True:
        objects: list[ShapeObject] = []
        seen = set()
        while len(objects) < k:
            idx = len(objects)
            if split == "heldout" and not force_relation and idx == 0:
                colour, shape = HELDOUT_PAIRS[int(rng.integers(len(HELDOUT_PAIRS)))]
            else:
                colour = colours[int(rng.integers(len(colours)))]
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                if force_relation and idx < 2:
                    shape = (HELDOUT_RELATION[0], HELDOUT_RELATION[2])[idx]
                if (colour, shape) in HELDOUT_PAIRS:
                    continue
            if (colour, shape) in seen:
                continue
            seen.add((colour, shape))
            size = SIZES[int(rng.integers(2))]
            lo, hi = size_range_px(size, height, width)
            objects.append(ShapeObject(shape, colour, size, (0.0, 0.0), float(rng.uniform(lo, hi))))
        relations = []
        if k >= 2:
            r = HELDOUT_RELATION[1] if force_relation else RELATIONS[int(rng.integers(4))]
            relations.append((0, r, 1))
        if k == 3:
            relations.append((1, RELATIONS[int(rng.integers(4))], 2))
        if not _place(rng, objects, relations, height, width):
            continue
        if split != "heldout" and _has_heldout(objects, height, width):
            continue
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        return SceneGraph(height, width, objects, relations, background,
                          int(rng.integers(2**31 - 1)))


# ---------------------------------------------------------------- rendering


def _star_unit() -> np.ndarray:
    angles = -math.pi / 2 + np.arange(10) * math.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _unit_polygon(shape: str) -> np.ndarray:
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
    if shape == "diamond":
        return np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], float)
    if shape == "triangle":
        return np.array([[0, -1], [1, 1], [-1, 1]], float)
    if shape == "star":
        return _star_unit()
    if shape == "cross":
        a = 1 / 3
        return np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1],
                         [-a, a], [-1, a], [-1, -a], [-a, -a]], float)
    raise KeyError(shape)


def _draw_object(draw: ImageDraw.ImageDraw, o: ShapeObject, ss: int) -> None:
    """Draw object ``o`` in white on an ``L`` canvas at ``ss`` times the resolution."""
    x0, y0, x1, y1 = (v * ss for v in o.bbox)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if o.shape in ("circle", "ring"):
        draw.ellipse([x0, y0, x1, y1], fill=255)
        if o.shape == "ring":
            rx, ry = (x1 - x0) / 4, (y1 - y0) / 4
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=0)
        return
    if o.shape == "semicircle":
        # The upper half of a circle of diameter (x1 - x0), flat side at y1.
        draw.pieslice([x0, y0, x1, y1 + (y1 - y0)], 180, 360, fill=255)
        return
    pts = _unit_polygon(o.shape)
    lo, hi = pts.min(0), pts.max(0)
    pts = (pts - lo) / (hi - lo)  # the polygon's box mapped to [0, 1]^2
    xy = np.stack([x0 + pts[:, 0] * (x1 - x0), y0 + pts[:, 1] * (y1 - y0)], axis=1)
    draw.polygon([tuple(p) for p in xy.tolist()], fill=255)


def _background(graph: SceneGraph) -> np.ndarray:
    """float ``[H, W, 3]`` background levels."""
    h, w = graph.height, graph.width
    base = np.full((h, w), 0.0)
    rng = np.random.default_rng(graph.texture_seed)
    if graph.background == "noise":
        n = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=1.5 * size_scale(h, w), mode="wrap")
        base = 12.0 * np.clip(n / (np.abs(n).max() + 1e-12), -1, 1)
    elif graph.background == "stripes":
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(6, 12) * size_scale(h, w)
        phase = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w] + 0.5
        base = 9.0 * np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period + phase)
    return np.asarray(BACKGROUND_RGB, float)[None, None, :] + base[:, :, None]


def render(graph: SceneGraph) -> tuple[np.ndarray, np.ndarray]:
    """Render a scene graph.

    Each object's coverage is drawn at ``SUPERSAMPLE`` times the resolution and
    box-filtered down, then blended over the background in the object's colour.

    Returns:
        image uint8 ``[3, H, W]`` and masks bool ``[K, H, W]`` (coverage >= 1/2).
    """
    h, w, ss = graph.height, graph.width, SUPERSAMPLE
    img = _background(graph)
    masks = np.zeros((len(graph.objects), h, w), bool)
    for k, o in enumerate(graph.objects):
        canvas = Image.new("L", (w * ss, h * ss), 0)
        _draw_object(ImageDraw.Draw(canvas), o, ss)
        alpha = np.asarray(canvas.reduce(ss), np.float64) / 255.0
        img = img * (1 - alpha[:, :, None]) + np.asarray(COLOURS[o.colour], float) * alpha[:, :, None]
        masks[k] = alpha >= 0.5
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8).transpose(2, 0, 1)
    return np.ascontiguousarray(image), masks


# ---------------------------------------------------------------- captions

_REL_WORDS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_REL_SHORT = {"left": "left of", "right": "right of", "above": "over", "below": "under"}


def _np(o: ShapeObject) -> str:
    return f"a {o.size} {o.colour} {o.shape}"


def _np_after(o: ShapeObject) -> str:
    return f"{o.colour} {o.shape}, {o.size},"


def _the(o: ShapeObject) -> str:
    return f"the {o.colour} {o.shape}"


def captions(graph: SceneGraph) -> list[str]:
    """The template captions of a scene (every one states every attribute and relation).

    Templates, with ``A``, ``B``, ``C`` the objects 0, 1, 2, ``r`` a relation phrase
    (``to the left of`` / ``left of``, ``to the right of`` / ``right of``, ``above`` /
    ``over``, ``below`` / ``under``) and ``r~`` its inverse:

    - one object: ``a small red circle``; ``red circle, small``; ``one small red circle``;
      ``a picture of a small red circle``.
    - two: ``A r B``; ``B r~ A``; ``red circle, small, r B``; ``A and B, the red circle r
      the blue star``.
    - three (relations A r B, B r' C): ``A r B, which is r' C``; ``C r'~ B, and A r the
      B-name``; ``A, B and C; the A-name r the B-name, the B-name r' the C-name``.
    """
    obj, rels = graph.objects, graph.relations
    if len(obj) == 1:
        a = obj[0]
        return [_np(a), f"{a.colour} {a.shape}, {a.size}", f"one {a.size} {a.colour} {a.shape}",
                f"a picture of {_np(a)}"]
    a, b = obj[0], obj[1]
    r = rels[0][1]
    if len(obj) == 2:
        return [
            f"{_np(a)} {_REL_WORDS[r]} {_np(b)}",
            f"{_np(b)} {_REL_SHORT[INVERSE_RELATION[r]]} {_np(a)}",
            f"{_np_after(a)} {_REL_SHORT[r]} {_np(b)}",
            f"{_np(a)} and {_np(b)}, {_the(a)} {_REL_WORDS[r]} {_the(b)}",
        ]
    c = obj[2]
    r2 = rels[1][1]
    return [
        f"{_np(a)} {_REL_WORDS[r]} {_np(b)}, which is {_REL_WORDS[r2]} {_np(c)}",
        f"{_np(c)} {_REL_SHORT[INVERSE_RELATION[r2]]} {_np(b)}, and {_np(a)} {_REL_SHORT[r]} {_the(b)}",
        f"{_np(a)}, {_np(b)} and {_np(c)}; {_the(a)} {_REL_WORDS[r]} {_the(b)}, "
        f"{_the(b)} {_REL_WORDS[r2]} {_the(c)}",
    ]


# ---------------------------------------------------------------- splits


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"shapes: unknown split {split!r}; valid: {', '.join(SPLITS)}")


def scene_graph(index: int, split: str = "test", seed: int = 0, height: int = 64, width: int = 64) -> SceneGraph:
    """The graph of scene ``index`` of ``split`` under ``seed``, without rendering it."""
    _check_split(split)
    rng = np.random.default_rng([_SPLIT_CODE[split], seed, index, height, width])
    return sample_graph(rng, height, width, split)


def make_scene(index: int, split: str = "test", seed: int = 0, height: int = 64, width: int = 64) -> Scene:
    """Scene ``index`` of ``split`` under ``seed`` (the same bytes on every call).

    Returns:
        the :class:`Scene` (image uint8 ``[3, H, W]``, masks bool ``[K, H, W]``, graph,
        captions).
    """
    graph = scene_graph(index, split, seed, height, width)
    image, masks = render(graph)
    return Scene(image, masks, graph, captions(graph))


def scene_set(split: str, n: int, seed: int = 0, height: int = 64, width: int = 64) -> list[Scene]:
    """The fixed set of scenes ``0..n-1`` of a split (``val``, ``test``, ``heldout``, or
    the first ``n`` of ``train``)."""
    return [make_scene(i, split, seed, height, width) for i in range(n)]


def train_stream(batch_size: int, seed: int = 0, height: int = 64, width: int = 64,
                 start: int = 0) -> Iterator[ShapesBatch]:
    """An endless stream of training batches: batch ``b`` holds train scenes
    ``start + b * batch_size ...`` of ``seed``, and its captions are drawn among each
    scene's templates by a generator of ``(seed, scene index)``, so a resumed stream
    (``start``) repeats the same batches.

    Yields:
        :class:`ShapesBatch` with images uint8 ``[B, 3, H, W]``.
    """
    if batch_size < 1:
        raise DataError(f"shapes: batch_size must be >= 1, got {batch_size}")
    i = start
    while True:
        scenes = [make_scene(i + k, "train", seed, height, width) for k in range(batch_size)]
        picks = [int(np.random.default_rng([7, seed, i + k]).integers(len(s.captions)))
                 for k, s in enumerate(scenes)]
        yield ShapesBatch(
            images=torch.from_numpy(np.stack([s.image for s in scenes])),
            captions=[s.captions[p] for s, p in zip(scenes, picks)],
            all_captions=[s.captions for s in scenes],
            graphs=[s.graph for s in scenes],
            masks=[s.masks for s in scenes],
        )
        i += batch_size


def class_index(colour: str, shape: str) -> int:
    """The label of ``(colour, shape)``: its index in :data:`CLASS_NAMES`."""
    return CLASS_NAMES.index(f"{colour} {shape}")


@dataclass(repr=False)
class ShapesDataset(ImageDataset):
    """An :class:`ImageDataset` of rendered scenes that also keeps each scene's graph,
    captions and masks (bool ``[K, H, W]``); labels are the first object's
    ``(colour, shape)`` index in :data:`CLASS_NAMES`."""

    graphs: list[SceneGraph] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)


def load_shapes(split: str = "train", image_size: int | tuple[int, int] | None = None,
                n: int | None = None, seed: int = 0) -> ShapesDataset:
    """A fixed in-memory set of scenes, for image-only training and evaluation.

    Args:
        split: ``train``, ``val``, ``test`` or ``heldout`` (``all`` is refused).
        image_size: ``S`` (``S x S``) or ``(H, W)``; default 64.
        n: number of scenes; default :data:`DATASET_SIZES` of the split.
        seed: the scenes are ``make_scene(i, split, seed)`` for ``i < n``.

    Returns:
        :class:`ShapesDataset`: images uint8 ``[N, 3, H, W]``, labels int64 ``[N]`` in
        ``0..71``, and ``graphs``, ``captions``, ``masks`` per scene.
    """
    _check_split(split)
    if image_size is None:
        h = w = 64
    elif isinstance(image_size, int):
        h = w = image_size
    else:
        h, w = image_size
    n = DATASET_SIZES[split] if n is None else n
    if n < 1:
        raise DataError(f"shapes: n must be >= 1, got {n}")
    scenes = scene_set(split, n, seed, h, w)
    labels = [class_index(s.graph.objects[0].colour, s.graph.objects[0].shape) for s in scenes]
    return ShapesDataset(
        images=torch.from_numpy(np.stack([s.image for s in scenes])),
        labels=torch.tensor(labels, dtype=torch.int64),
        num_classes=len(CLASS_NAMES), class_names=list(CLASS_NAMES), name="shapes", split=split,
        graphs=[s.graph for s in scenes], captions=[s.captions for s in scenes],
        masks=[s.masks for s in scenes],
    )
