"""Captioned procedural scenes: 1-3 coloured shapes with pairwise spatial relations.

Every image comes with its scene graph (:class:`Scene`) and template captions, and everything
is a pure function of a seed, so the training stream, the validation and test sets and the
held-out compositions are reproducible without any download.

Vocabulary
----------
Shapes: ``circle, square, triangle, star, ring, cross``.

Colours (RGB, on a dark grey background ``(40, 40, 40)``; every pair is at least 90 apart in
RGB, every colour at least 170 from the background)::

    red     (230,  40,  40)    green   ( 40, 200,  60)    blue    ( 50,  80, 240)
    yellow  (240, 230,  40)    magenta (220,  50, 220)    cyan    ( 40, 220, 230)
    orange  (245, 140,  20)    white   (245, 245, 245)

Sizes: an object's radius (the circle through its outermost points) is 6 px (``small``) or
11 px (``large``) on a 64x64 canvas, scaled by ``min(height, width) / 64`` at other sizes, so
a small object spans 12 px at 64x64.

Layout: centres are drawn on a reference 64x64 canvas and stored normalised to ``[0, 1]``
(``x`` to the right, ``y`` downwards), objects' bounding circles are at least 3 px apart, and
each consecutive pair ``(i, i + 1)`` carries one relation (``left of``, ``right of``,
``above``, ``below``) along the axis where the two centres differ most, that difference being
at least ``RELATION_MARGIN`` (8 px at 64x64). Within a scene no two objects share both colour
and shape, so every caption names each object unambiguously.

Rendering: each object's mask is drawn at 4x resolution and box-downsampled, and the colour is
alpha-blended over the background (anti-aliased edges).

Held-out compositions: the (colour, shape) pairs in ``HELDOUT_PAIRS`` never appear in the
``train`` stream, ``val`` or ``test``; every scene of the ``heldout`` split contains at least one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from flowdit.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 240),
    "yellow": (240, 230, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 230),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
}
BACKGROUND = (40, 40, 40)
SIZES = {"small": 6.0, "large": 11.0}  # radius in px on the 64x64 reference canvas
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RELATION_MARGIN = 8.0  # px on the reference canvas
GAP = 3.0  # px between bounding circles on the reference canvas
REFERENCE = 64
SUPERSAMPLE = 4

# (colour, shape) pairs kept out of train / val / test; one per shape, no colour twice.
HELDOUT_PAIRS = frozenset(
    {
        ("red", "star"),
        ("blue", "ring"),
        ("green", "triangle"),
        ("yellow", "cross"),
        ("magenta", "square"),
        ("cyan", "circle"),
    }
)

SPLITS = ("train", "val", "test", "heldout")
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "heldout": 3}
SPLIT_SIZES = {"val": 1000, "test": 1000, "heldout": 1000}

# Shape geometry relative to the radius r (the circle through the outermost points).
SQUARE_HALF = 0.7  # half side; corners at 0.99 r
RING_INNER = 0.5  # inner radius of the ring
CROSS_HALF_WIDTH = 0.33  # half width of a cross's arms
STAR_INNER = 0.45  # inner radius of the 5-pointed star


@dataclass(frozen=True)
class SceneObject:
    """One object: shape, colour and size names, and its centre ``(x, y)`` in ``[0, 1]``."""

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]

    def phrase(self) -> str:
        """The object's noun phrase, e.g. ``"a small red circle"``."""
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A scene graph: objects, and relations ``(i, relation, j)`` meaning
    "object i is <relation> object j"."""

    objects: tuple[SceneObject, ...]
    relations: tuple[tuple[int, str, int], ...] = field(default=())

    def captions(self) -> list[str]:
        """Every template caption of the scene (paraphrases: each relation in either
        direction, clauses in either order, three lead-ins)."""
        return _captions(self)

    def caption(self, rng: np.random.Generator | None = None) -> str:
        """One caption: the first template, or one drawn with ``rng``."""
        caps = self.captions()
        return caps[0] if rng is None else caps[int(rng.integers(len(caps)))]


def graph_signature(scene: Scene) -> tuple[frozenset, frozenset]:
    """The scene graph without centres and object order: the set of ``(colour, shape, size)``
    and the set of relations written as ``(a, "left of" | "above", b)`` (either direction of a
    relation gives the same entry). Two scenes with one signature have the same captions."""
    key = [(o.colour, o.shape, o.size) for o in scene.objects]
    rels = set()
    for i, r, j in scene.relations:
        a, b = key[i], key[j]
        if r in ("right of", "below"):
            a, b, r = b, a, INVERSE[r]
        rels.add((a, r, b))
    return frozenset(key), frozenset(rels)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape (None for circle and ring)."""
    if shape == "square":
        h = SQUARE_HALF * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # equilateral, pointing up, inscribed in the circle
        angles = (0.0, 2 * math.pi / 3, 4 * math.pi / 3)
        return [(cx + r * math.sin(a), cy - r * math.cos(a)) for a in angles]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else STAR_INNER * r
            a = k * math.pi / 5
            pts.append((cx + rad * math.sin(a), cy - rad * math.cos(a)))
        return pts
    if shape == "cross":
        w = CROSS_HALF_WIDTH * r
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    return None


def shape_area_coefficient(shape: str) -> float:
    """Area of ``shape`` divided by ``r**2`` (holes filled; used to estimate size from pixels)."""
    if shape in ("circle", "ring"):
        return math.pi
    pts = np.asarray(_polygon(shape, 0.0, 0.0, 1.0))
    x, y = pts[:, 0], pts[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _draw_mask(shape: str, cx: float, cy: float, r: float, height: int, width: int) -> np.ndarray:
    """Coverage in ``[0, 1]`` of one object, drawn at 4x and box-downsampled."""
    s = SUPERSAMPLE
    img = Image.new("L", (width * s, height * s), 0)
    d = ImageDraw.Draw(img)
    X, Y, R = cx * s, cy * s, r * s
    if shape in ("circle", "ring"):
        d.ellipse([X - R, Y - R, X + R, Y + R], fill=255)
        if shape == "ring":
            ri = RING_INNER * R
            d.ellipse([X - ri, Y - ri, X + ri, Y + ri], fill=0)
    else:
        d.polygon(_polygon(shape, X, Y, R), fill=255)
    small = img.reduce(s)  # box filter over each s x s block
    return np.asarray(small, dtype=np.float32) / 255.0


def object_radius_px(size: str, height: int, width: int) -> float:
    """Radius in pixels of an object of ``size`` on a ``height x width`` canvas."""
    return SIZES[size] * min(height, width) / REFERENCE


def render_scene(scene: Scene, height: int = 64, width: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Render ``scene``: returns the image (uint8 ``[H, W, 3]``) and instance masks
    (bool ``[n_objects, H, W]``, a pixel belonging to an object where its coverage is >= 0.5)."""
    if height < 16 or width < 16:
        raise ConfigError(f"render_scene: height and width must be >= 16, got {height}x{width}")
    img = np.empty((height, width, 3), np.float32)
    img[:] = BACKGROUND
    masks = np.zeros((len(scene.objects), height, width), bool)
    for k, ob in enumerate(scene.objects):
        if ob.shape not in SHAPES or ob.colour not in COLOURS or ob.size not in SIZES:
            raise ConfigError(f"render_scene: unknown object {ob}")
        cov = _draw_mask(ob.shape, ob.centre[0] * width, ob.centre[1] * height,
                         object_radius_px(ob.size, height, width), height, width)  # fmt: skip
        colour = np.asarray(COLOURS[ob.colour], np.float32)
        img = img * (1.0 - cov[..., None]) + colour * cov[..., None]
        masks[k] = cov >= 0.5
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), masks


def relation_between(a: tuple[float, float], b: tuple[float, float]) -> str:
    """The relation of centre ``a`` to centre ``b`` along the axis where they differ most."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _allowed_pairs(split: str) -> list[tuple[str, str]]:
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    if split in ("train", "val", "test"):
        return [p for p in pairs if p not in HELDOUT_PAIRS]
    return pairs


def random_scene(rng: np.random.Generator, n_objects: int | None = None, split: str = "train") -> Scene:
    """Draw a scene of ``n_objects`` (1-3; uniform if None) with ``rng``.

    ``split`` decides the compositions: ``train``/``val``/``test`` never use a pair of
    ``HELDOUT_PAIRS``; ``heldout`` puts at least one held-out pair in every scene."""
    if split not in SPLITS:
        raise ConfigError(f"random_scene: split must be one of {SPLITS}, got {split!r}")
    if n_objects is None:
        n_objects = int(rng.integers(1, 4))
    if not 1 <= n_objects <= 3:
        raise ConfigError(f"random_scene: n_objects must be 1, 2 or 3, got {n_objects}")
    allowed = _allowed_pairs(split)
    while True:
        idx = rng.choice(len(allowed), size=n_objects, replace=False)
        pairs = [allowed[int(i)] for i in idx]
        if split == "heldout" and not any(p in HELDOUT_PAIRS for p in pairs):
            continue
        sizes = [("small", "large")[int(rng.integers(2))] for _ in range(n_objects)]
        centres = _place(rng, [SIZES[s] for s in sizes])
        if centres is None:
            continue
        objects = tuple(
            SceneObject(shape=s, colour=c, size=z, centre=(x / REFERENCE, y / REFERENCE))
            for (c, s), z, (x, y) in zip(pairs, sizes, centres)
        )
        rels = tuple(
            (i, relation_between(centres[i], centres[i + 1]), i + 1) for i in range(n_objects - 1)
        )
        return Scene(objects=objects, relations=rels)


def _place(
    rng: np.random.Generator, radii: list[float], tries: int = 400
) -> list[tuple[float, float]] | None:
    """Centres on the reference canvas: inside, bounding circles GAP apart, consecutive
    pairs separated by >= RELATION_MARGIN on their major axis; None if no layout was found."""
    out: list[tuple[float, float]] = []
    for r in radii:
        lo, hi = r + 1.0, REFERENCE - r - 1.0
        for _ in range(tries):
            x, y = rng.uniform(lo, hi, size=2)
            if any(math.hypot(x - px, y - py) < r + pr + GAP for (px, py), pr in zip(out, radii)):
                continue
            if out:
                px, py = out[-1]
                if max(abs(x - px), abs(y - py)) < RELATION_MARGIN:
                    continue
            out.append((float(x), float(y)))
            break
        else:
            return None
    return out


_LEADS = ("", "a picture of ", "an image showing ")


def _clause(scene: Scene, rel: tuple[int, str, int], flip: bool) -> str:
    i, r, j = rel
    a, b = scene.objects[i], scene.objects[j]
    if flip:
        a, b, r = b, a, INVERSE[r]
    words = "to the left of" if r == "left of" else "to the right of" if r == "right of" else r
    return f"{a.phrase()} {words} {b.phrase()}"


def _captions(scene: Scene) -> list[str]:
    if not scene.relations:
        bodies = [scene.objects[0].phrase()] if scene.objects else []
    elif len(scene.relations) == 1:
        bodies = [_clause(scene, scene.relations[0], f) for f in (False, True)]
    else:
        bodies = []
        for order in (0, 1):
            rels = scene.relations if order == 0 else scene.relations[::-1]
            for f0 in (False, True):
                for f1 in (False, True):
                    bodies.append(f"{_clause(scene, rels[0], f0)} and {_clause(scene, rels[1], f1)}")
    return [lead + b for lead in _LEADS for b in bodies]


def scene_seed(split: str, index: int, seed: int = 0) -> np.random.Generator:
    """The generator of scene ``index`` of ``split`` (each scene reproducible on its own)."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    return np.random.default_rng([_SPLIT_IDS[split], seed, index])


def split_scenes(split: str, n: int | None = None, seed: int = 0) -> list[Scene]:
    """The fixed scenes of ``val``, ``test`` or ``heldout`` (``n`` of them; default
    ``SPLIT_SIZES[split]``), or the first ``n`` of the ``train`` stream."""
    if split == "train" and n is None:
        raise ConfigError("split_scenes: the train stream is endless; pass n")
    if n is None:
        n = SPLIT_SIZES[split]
    return [random_scene(scene_seed(split, i, seed), split=split) for i in range(n)]


def train_stream(
    seed: int = 0, height: int = 64, width: int = 64
) -> Iterator[tuple[np.ndarray, Scene, str]]:
    """Endless ``(image, scene, caption)`` triples of the training distribution; the caption is
    one of the scene's paraphrases, drawn with the scene's own generator."""
    i = 0
    while True:
        rng = scene_seed("train", i, seed)
        scene = random_scene(rng, split="train")
        image, _ = render_scene(scene, height, width)
        yield image, scene, scene.caption(rng)
        i += 1


