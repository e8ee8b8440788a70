"""A judge for :mod:`flowdit.data.shapes` scenes that decides from pixels alone.

No network is involved: every pixel is given the nearest named colour (or the background) when
it lies within ``COLOUR_THRESHOLD`` of it in RGB, each colour's mask is split into 8-connected
components, and each component large enough to be an object is described by

- its **shape**, from geometric features: a hole (ring); else the dominant harmonic 3, 4 or 5
  of its radial profile (distance from the centroid against angle: triangle, square or cross,
  star), cross and square told apart by solidity = area / convex-hull area (0.7 against 1);
  a weak dominant harmonic still decides when the blob is too concave (solidity < 0.86) to be
  a circle or square (small stars); otherwise square (a weak harmonic 4 or a full bounding
  box) or else circle;
- its **size**, from the radius its hole-filled area implies for the detected shape
  (``sqrt(area / shape_area_coefficient(shape))``), split at the geometric mean of the radii;
- its **centre**, the centroid of the hole-filled mask, normalised to ``[0, 1]``.

:func:`judge` matches the detections to a scene graph (optimal assignment on agreeing
attributes) and scores every attribute, the object count, every relation and the whole prompt.
"""

from __future__ import annotations

import math
import re

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.spatial import ConvexHull

from flowdit.data.shapes import (
    BACKGROUND,
    COLOURS,
    INVERSE,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    shape_area_coefficient,
)
from flowdit.errors import DataError

COLOUR_THRESHOLD = 70.0  # max RGB distance of a pixel to its named colour
MIN_AREA_FRACTION = 0.35  # of the smallest object's expected area, below which a blob is noise
HOLE_FRACTION = 0.08  # hole area / filled area above which a blob is a ring
HARMONIC_THRESHOLD = 0.1  # radial harmonic (relative) above which a blob has that many corners

_NAMES = list(COLOURS)
_PALETTE = np.asarray([COLOURS[n] for n in _NAMES] + [BACKGROUND], np.float32)
_AREA_K = {s: shape_area_coefficient(s) for s in SHAPES}
_SIZE_SPLIT = math.sqrt(SIZES["small"] * SIZES["large"])  # reference px


def segment_colours(image: np.ndarray) -> np.ndarray:
    """Per-pixel index into the named colours (``len(COLOURS)`` for background or no colour)."""
    img = np.asarray(image, np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise DataError(f"segment_colours: expected an [H, W, 3] image, got shape {img.shape}")
    if img.max() <= 1.0 + 1e-6 and np.asarray(image).dtype != np.uint8:
        img = img * 255.0
    d = np.linalg.norm(img[:, :, None, :] - _PALETTE[None, None], axis=-1)
    lab = d.argmin(-1)
    lab[d.min(-1) > COLOUR_THRESHOLD] = len(_NAMES)
    return lab


def _hull_area(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    pts = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    try:
        return float(ConvexHull(pts).volume)
    except Exception:  # degenerate (a line of pixels)
        return float(mask.sum())


def radial_harmonics(filled: np.ndarray, cy: float, cx: float, bins: int = 32) -> np.ndarray:
    """Magnitudes of harmonics 0-6 of the radial profile (the largest distance from the
    centroid, per angle bin, over the pixels' corners), each divided by harmonic 0: a
    k-cornered shape has a strong harmonic k (triangle 3, square and cross 4, star 5)."""
    ys, xs = np.nonzero(filled)
    px = np.concatenate([xs + dx for dx in (0.0, 1.0) for _ in (0, 1)])
    py = np.concatenate([ys + dy for _ in (0, 1) for dy in (0.0, 1.0)])
    ang = np.arctan2(py - cy, px - cx)
    dist = np.hypot(py - cy, px - cx)
    idx = ((ang + np.pi) / (2 * np.pi) * bins).astype(int) % bins
    prof = np.zeros(bins)
    np.maximum.at(prof, idx, dist)
    for k in np.nonzero(prof == 0)[0]:  # an empty bin takes its neighbours' value
        prof[k] = max(prof[k - 1], prof[(k + 1) % bins])
    spec = np.abs(np.fft.rfft(prof))[:7]
    return spec / max(spec[0], 1e-9)


def object_features(mask: np.ndarray) -> dict:
    """Geometric features of one blob: area, filled area, hole fraction, solidity, bbox fill
    ratio, radial harmonics and centroid ``(x, y)`` in pixels."""
    filled = ndimage.binary_fill_holes(mask)
    area, farea = int(mask.sum()), int(filled.sum())
    ys, xs = np.nonzero(filled)
    bbox = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    return {
        "area": area,
        "filled_area": farea,
        "hole": (farea - area) / farea,
        "solidity": farea / _hull_area(filled),
        "fill": farea / bbox,
        "harmonics": radial_harmonics(filled, cy, cx),
        "centre": (float(cx), float(cy)),
    }


def classify_shape(f: dict) -> str:
    """The shape whose geometry the features ``f`` (of :func:`object_features`) fit."""
    if f["hole"] >= HOLE_FRACTION:
        return "ring"
    h = f["harmonics"]
    k = 3 + int(np.argmax(h[3:6]))
    if h[k] > HARMONIC_THRESHOLD or f["solidity"] < 0.86:  # corners, or too concave for a circle
        if k == 3:
            return "triangle"
        if k == 5:
            return "star"
        return "cross" if f["solidity"] < 0.85 else "square"
    return "square" if h[4] > 0.045 or f["fill"] > 0.92 else "circle"


def detect_objects(image: np.ndarray) -> list[SceneObject]:
    """Every object found in ``image`` (uint8 ``[H, W, 3]``, or float in ``[0, 1]``)."""
    lab = segment_colours(image)
    H, W = lab.shape
    scale = min(H, W) / 64.0
    min_area = MIN_AREA_FRACTION * min(_AREA_K.values()) * (SIZES["small"] * scale) ** 2
    found = []
    for ci, name in enumerate(_NAMES):
        comps, n = ndimage.label(lab == ci, structure=np.ones((3, 3), bool))
        for k in range(1, n + 1):
            m = comps == k
            if m.sum() < min_area:
                continue
            f = object_features(m)
            shape = classify_shape(f)
            radius = math.sqrt(f["filled_area"] / _AREA_K[shape]) / scale
            size = "large" if radius > _SIZE_SPLIT else "small"
            cx, cy = f["centre"]
            found.append(SceneObject(shape=shape, colour=name, size=size, centre=(cx / W, cy / H)))
    return found


def _holds(rel: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    dx, dy = a[0] - b[0], a[1] - b[1]
    return {"left of": dx < 0, "right of": dx > 0, "above": dy < 0, "below": dy > 0}[rel]


def judge(image: np.ndarray, scene: Scene) -> dict:
    """Score ``image`` against ``scene``: ``colour``, ``shape``, ``size`` (fractions of the
    scene's objects whose matched detection has that attribute right; unmatched objects count
    as wrong), ``object`` (fraction with all three right), ``count`` (bool: as many detections
    as objects), ``relation`` (fraction of relations holding between the matched detections'
    centres; 1.0 without relations), ``exact`` (bool: everything right) and ``detected``."""
    det = detect_objects(image)
    objs = scene.objects
    match: dict[int, SceneObject] = {}
    if det and objs:
        cost = np.zeros((len(objs), len(det)))
        for i, o in enumerate(objs):
            for j, d in enumerate(det):
                dist = math.hypot(o.centre[0] - d.centre[0], o.centre[1] - d.centre[1])
                agree = 4 * (o.colour == d.colour) + 2 * (o.shape == d.shape) + (o.size == d.size)
                cost[i, j] = 0.1 * dist - agree
        rows, cols = linear_sum_assignment(cost)
        match = {int(r): det[int(c)] for r, c in zip(rows, cols)}
    n = max(len(objs), 1)
    per = {
        a: sum(1 for i, o in enumerate(objs) if i in match and getattr(match[i], a) == getattr(o, a)) / n
        for a in ("colour", "shape", "size")
    }
    whole = sum(
        1 for i, o in enumerate(objs)
        if i in match and (match[i].colour, match[i].shape, match[i].size) == (o.colour, o.shape, o.size)
    ) / n  # fmt: skip
    rel_ok = [
        i in match and j in match and _holds(r, match[i].centre, match[j].centre) for i, r, j in scene.relations
    ]
    relation = sum(rel_ok) / len(rel_ok) if rel_ok else 1.0
    count = len(det) == len(objs)
    return {
        **per,
        "object": whole,
        "count": count,
        "relation": relation,
        "exact": bool(count and whole == 1.0 and relation == 1.0),
        "detected": det,
    }


_PHRASE = r"an? (small|large) (\w+) (circle|square|triangle|star|ring|cross)"
_REL = r"to the left of|to the right of|above|below"
_CLAUSE = re.compile(rf"^{_PHRASE}(?: ({_REL}) {_PHRASE})?$")
_LEAD = re.compile(r"^(a picture of |an image showing )")


def parse_caption(text: str) -> Scene:
    """The scene graph of a caption written by the templates of :mod:`flowdit.data.shapes`
    (centres are unknown and set to ``(0.5, 0.5)``; objects in order of first mention)."""
    body = _LEAD.sub("", text.strip().lower().rstrip("."))
    objects: list[tuple[str, str, str]] = []
    rels: list[tuple[int, str, int]] = []

    def index(size: str, colour: str, shape: str) -> int:
        if colour not in COLOURS:
            raise DataError(f"parse_caption: unknown colour {colour!r} in {text!r}")
        key = (shape, colour, size)
        if key not in objects:
            objects.append(key)
        return objects.index(key)

    for clause in body.split(" and "):
        m = _CLAUSE.match(clause.strip())
        if m is None:
            raise DataError(f"parse_caption: cannot parse {clause!r} of {text!r}")
        a = index(*m.group(1, 2, 3))
        if m.group(4):
            b = index(*m.group(5, 6, 7))
            rel = m.group(4).replace("to the ", "")
            rels.append((a, rel, b) if a < b else (b, INVERSE[rel], a))
    return Scene(
        objects=tuple(SceneObject(shape=s, colour=c, size=z, centre=(0.5, 0.5)) for s, c, z in objects),
        relations=tuple(rels),
    )
