"""A judge of procedural scenes (:mod:`flowdit.data.shapes`) that reads objects off the pixels.

No network sees generated images. The judge:

1. **segments by colour**: every pixel goes to its nearest named colour or to the grey
   background, if that colour lies within ``COLOUR_THRESHOLD`` (45, RGB Euclidean) and
   is otherwise left unassigned (anti-aliased edges, stray colours);
2. **finds objects**: 8-connected components of each colour (``scipy.ndimage.label``) of
   at least ``8 * s^2`` pixels (``s = min(H, W) / 64``), each grown back over its
   anti-aliased rim (pixels within 2 px whose colour lies on the segment between the
   background and the object's colour, at least half way), which gives back the render's
   half-coverage mask;
3. **names the shape** from geometric features of that mask (:func:`shape_features`:
   bounding-box aspect and extent, solidity against the convex hull, number and share of
   holes, log area, and the estimated coverage resampled to 8x8 over the box) with an
   RBF support-vector machine (scikit-learn) fitted on the
   features of *rendered* objects only (all shapes, colours, backgrounds, sizes from 8 to
   38 px, with mild noise and blur), built once per process from a fixed seed;
4. **size** is small when the larger box side is below ``size_threshold_px`` (16.2 px at
   64x64), **position** the box centre; relations are read along the dominant axis of two
   centres' offset with a 2 px margin (``flowdit.data.shapes.geometric_relation``).

:func:`score` compares the detections with a prompt's :class:`~flowdit.data.shapes.SceneSpec`
(from a scene graph, or from :func:`parse_caption` for a user's prompt): objects are
matched one to one by the Hungarian algorithm on the number of disagreeing attributes;
per-attribute accuracy, object count, relation accuracy and whole-prompt exact match
follow. Its accuracy on rendered scenes is measured by ``benchmarks/shapes_judge.py``.

FID on renders (the features of a network trained on real renders, not this decision
rule) will be a feature network in :mod:`flowdit.eval.networks`, used through
:mod:`flowdit.evaluate` as the digit and MNIST evaluators are.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.spatial import ConvexHull, QhullError

from flowdit.data.shapes import (
    BACKGROUND_RGB, BACKGROUNDS, COLOURS, SHAPES, SIZES, ObjectSpec, SceneGraph, SceneSpec,
    ShapeObject, geometric_relation, object_bbox, relation_holds, render, size_scale, size_threshold_px,
)
from flowdit.errors import ConfigError, DataError

__all__ = [
    "COLOUR_THRESHOLD", "Detection", "JudgeScore", "segment_colours", "detect", "shape_features",
    "shape_classifier", "parse_caption", "score", "summarise", "judge_margin", "geometric_relation",
]

COLOUR_THRESHOLD = 45.0
_COLOUR_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _COLOUR_NAMES] + [BACKGROUND_RGB], np.float64)
_BG = len(_COLOUR_NAMES)
_GRID = 8


@dataclass
class Detection:
    """An object found in an image: its colour, shape (with ``confidence``, a softmax of the
    classifier's one-vs-rest scores: a ranking, not a calibrated probability),
    size, box centre ``(x, y)``, box ``(x0, y0, x1, y1)`` (pixel edges) and mask bool
    ``[H, W]``."""

    colour: str
    shape: str
    size: str
    centre: tuple[float, float]
    bbox: tuple[int, int, int, int]
    area: int
    confidence: float
    mask: np.ndarray = field(repr=False)

    @property
    def size_px(self) -> int:
        """The larger side of the box in pixels."""
        return max(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1])


@dataclass
class JudgeScore:
    """One image against one prompt. ``colour``, ``shape``, ``size``: objects of the prompt
    whose matched detection has the attribute right, of ``num_objects`` (``size`` counts
    only objects whose size is stated, of ``num_sized``); ``relations_ok`` of
    ``num_relations``; ``count_ok``: as many detections as objects; ``exact``: all of it."""

    num_objects: int
    colour: int
    shape: int
    size: int
    num_sized: int
    relations_ok: int
    num_relations: int
    count_ok: bool
    exact: bool
    detections: list[Detection] = field(repr=False, default_factory=list)


def _as_hwc_uint8(image) -> np.ndarray:
    """uint8 ``[H, W, 3]`` from uint8 ``[3, H, W]`` (numpy or torch) or float ``[3, H, W]``
    in [-1, 1] (rounded as ``flowdit.data.to_uint8`` does)."""
    if isinstance(image, torch.Tensor):
        if image.is_floating_point():
            image = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise DataError(f"shapes judge: expected an image [3, H, W], got shape {image.shape}")
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating):
            image = np.rint((np.clip(image, -1, 1) + 1) * 127.5).astype(np.uint8)
        else:
            raise DataError(f"shapes judge: expected uint8 or float pixels, got {image.dtype}")
    return np.ascontiguousarray(image.transpose(1, 2, 0))


def segment_colours(image, threshold: float = COLOUR_THRESHOLD) -> np.ndarray:
    """Nearest named colour per pixel.

    Args:
        image: uint8 ``[3, H, W]`` or float ``[3, H, W]`` in [-1, 1].
        threshold: largest RGB distance to a named colour for a pixel to be assigned.

    Returns:
        int ``[H, W]``: the index in ``COLOURS`` order, ``len(COLOURS)`` for background,
        -1 for unassigned pixels.
    """
    px = _as_hwc_uint8(image).astype(np.float64)
    d2 = (px * px).sum(-1)[:, :, None] - 2.0 * px @ _PALETTE.T + (_PALETTE * _PALETTE).sum(-1)
    lab = d2.argmin(-1)
    lab[np.take_along_axis(d2, lab[:, :, None], -1)[:, :, 0] > threshold * threshold] = -1
    return lab


def judge_margin(height: int, width: int) -> float:
    """The margin (pixels) a relation must clear in the judge: 2 px at 64x64, scaled."""
    return 2.0 * size_scale(height, width)


def shape_features(mask: np.ndarray, coverage: np.ndarray | None = None) -> np.ndarray:
    """Geometric features of one object's mask.

    Args:
        mask: bool ``[h, w]`` (any crop holding the object).
        coverage: optional float ``[h, w]`` in [0, 1], the object's estimated coverage of
            each pixel (anti-aliased edges); the 8x8 grid is resampled from it when given,
            else from the mask.

    Returns:
        float64 ``[6 + 64]``: aspect (box height / width), extent (area / box area),
        solidity (area / convex hull area), number of holes, hole share of the filled area,
        log area, and the mask resampled to 8x8 over its box.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return np.zeros(6 + _GRID * _GRID)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    m = mask[y0:y1, x0:x1]
    h, w = m.shape
    area = float(m.sum())
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    try:
        hull = ConvexHull(corners.astype(np.float64)).volume
    except QhullError:
        hull = area
    filled = ndimage.binary_fill_holes(m)
    holes, n_holes = ndimage.label(filled & ~m)
    sizes = np.bincount(holes.ravel())[1:] if n_holes else np.zeros(0)
    n_holes = int((sizes >= 2).sum())
    cov = m.astype(np.float32) if coverage is None else np.clip(coverage[y0:y1, x0:x1], 0, 1).astype(np.float32)
    grid = np.asarray(Image.fromarray(cov, mode="F").resize((_GRID, _GRID), Image.BOX), np.float64)
    return np.concatenate([[h / w, area / (h * w), area / max(hull, 1.0), n_holes,
                            1.0 - area / max(float(filled.sum()), 1.0), math.log(area)], grid.ravel()])


def _components(image, min_area: float | None = None):
    """Objects as (colour index, mask bool [H, W], coverage float [H, W]) triples."""
    hwc = _as_hwc_uint8(image)
    h, w, _ = hwc.shape
    lab = segment_colours(image)
    px = hwc.astype(np.float64)
    bg = np.asarray(BACKGROUND_RGB, np.float64)
    s = size_scale(h, w)
    min_area = 8.0 * s * s if min_area is None else min_area
    structure = np.ones((3, 3), bool)
    out = []
    for c in range(len(_COLOUR_NAMES)):
        comps, n = ndimage.label(lab == c, structure=structure)
        if n == 0:
            continue
        areas = np.bincount(comps.ravel())
        col = _PALETTE[c]
        direction = col - bg
        alpha = ((px - bg) @ direction) / float(direction @ direction)
        residual = np.linalg.norm(px - bg - alpha[:, :, None] * direction, axis=-1)
        rim = (alpha >= 0.5) & (residual <= COLOUR_THRESHOLD) & ((lab == -1) | (lab == c))
        for k in range(1, n + 1):
            if areas[k] < min_area:
                continue
            core = comps == k
            near = ndimage.binary_dilation(core, structure=structure, iterations=2)
            mask = core | (near & rim)
            cover = np.where(near & ((lab == -1) | (lab == c)), np.clip(alpha, 0, 1), 0.0)
            out.append((c, mask, np.where(core, 1.0, cover)))
    return out


def _size_name(size_px: float, height: int, width: int) -> str:
    return "small" if size_px < size_threshold_px(height, width) else "large"


def detect(image, min_area: float | None = None) -> list[Detection]:
    """The objects in a scene image.

    Args:
        image: uint8 ``[3, H, W]`` or float ``[3, H, W]`` in [-1, 1].
        min_area: components smaller than this (pixels) are ignored; default ``8 s^2``.

    Returns:
        one :class:`Detection` per object found, in raster order of their box corners.
    """
    hwc = _as_hwc_uint8(image)
    h, w, _ = hwc.shape
    comps = _components(image, min_area)
    if not comps:
        return []
    feats = np.stack([shape_features(m, cov) for _, m, cov in comps])
    score = np.atleast_2d(shape_classifier().decision_function(feats))
    proba = np.exp(score - score.max(1, keepdims=True))
    proba /= proba.sum(1, keepdims=True)
    dets = []
    for (c, m, _), p in zip(comps, proba):
        ys, xs = np.nonzero(m)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        centre = ((bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2)
        k = int(p.argmax())
        size_px = max(bbox[2] - bbox[0], bbox[3] - bbox[1])
        dets.append(Detection(_COLOUR_NAMES[c], SHAPES[k], _size_name(size_px, h, w), centre, bbox,
                              int(m.sum()), float(p[k]), m))
    dets.sort(key=lambda d: (d.bbox[1], d.bbox[0]))
    return dets


def _training_set(per_shape: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features ``[8 * per_shape, F]`` and shape indices of rendered single objects."""
    rng = np.random.default_rng([1801, seed])
    feats, labels = [], []
    for k, shape in enumerate(SHAPES):
        got = 0
        while got < per_shape:
            side = int(rng.integers(32, 97))
            d = float(np.exp(rng.uniform(math.log(8.0), math.log(min(38.0, 0.6 * side)))))
            centre = (float(rng.uniform(0.4, 0.6) * side), float(rng.uniform(0.4, 0.6) * side))
            obj = ShapeObject(shape, _COLOUR_NAMES[int(rng.integers(len(_COLOUR_NAMES)))], "small", centre, d)
            obj.bbox = object_bbox(obj)
            graph = SceneGraph(side, side, [obj], [], BACKGROUNDS[int(rng.integers(3))],
                               int(rng.integers(2**31 - 1)))
            img = _degrade(render(graph)[0], rng)
            comps = _components(img)
            if not comps:
                continue
            _, m, cov = max(comps, key=lambda cm: cm[1].sum())
            feats.append(shape_features(m, cov))
            labels.append(k)
            got += 1
    return np.stack(feats), np.array(labels)


@functools.lru_cache(maxsize=1)
def shape_classifier(per_shape: int = 120, seed: int = 0):
    """The shape classifier, fitted once per process on rendered single objects.

    Each training object is a fresh render (random colour, background, size 8-38 px
    log-uniform, image 32-96 px on a side, sub-pixel position; a third with Gaussian noise
    of sigma up to 0.06 in [-1, 1] units, a third with a Gaussian blur of sigma 0.3-0.9 px),
    segmented by the judge's own pipeline. Returns a fitted ``sklearn`` pipeline (standard
    scaling, an RBF support-vector machine) whose ``decision_function`` columns are in
    ``SHAPES`` order.
    """
    x, y = _training_set(per_shape, seed)
    return _fit(x, y, seed)


def _fit(x: np.ndarray, y: np.ndarray, seed: int):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return make_pipeline(StandardScaler(), SVC(C=10.0, random_state=seed)).fit(x, y)


def _degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mode = int(rng.integers(3))
    if mode == 0:
        return img
    x = img.astype(np.float64)
    if mode == 1:
        x = x + rng.normal(0, rng.uniform(0, 0.06) * 127.5, x.shape)
    else:
        sigma = float(rng.uniform(0.3, 0.9))
        x = ndimage.gaussian_filter(x, sigma=(0, sigma, sigma), mode="nearest")
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- captions

_REL_PHRASES = {
    "to the left of": "left", "left of": "left", "to the right of": "right", "right of": "right",
    "above": "above", "over": "above", "below": "below", "under": "below", "beneath": "below",
}
_MENTION = (r"(?:\b(?:a|an|one|the)\s+)?(?:\b(?P<size>" + "|".join(SIZES) + r")\s+)?\b(?P<colour>"
            + "|".join(COLOURS) + r")\s+(?P<shape>" + "|".join(SHAPES) + r")s?\b"
            + r"(?:\s*,\s*(?P<size2>" + "|".join(SIZES) + r")\b)?")
_RELATION = r"\b(?P<rel>" + "|".join(sorted(_REL_PHRASES, key=len, reverse=True)) + r")\b"
_TOKEN = re.compile(f"(?P<mention>{_MENTION})|{_RELATION}", re.IGNORECASE)


def parse_caption(text: str) -> SceneSpec:
    """The scene a caption states, in the vocabulary of :mod:`flowdit.data.shapes`.

    Reads, left to right, object mentions (``[a|an|one|the] [small|large] COLOUR SHAPE
    [, small|large]``) and relation phrases (``to the left of``, ``left of``, ``right of``,
    ``above``, ``over``, ``below``, ``under``, ...). A relation links the mention just
    before it to the one just after it; a mention of a colour and shape already seen names
    the same object (``"the red circle"``). Every template of
    :func:`flowdit.data.shapes.captions` parses back to its graph's spec (up to
    :meth:`SceneSpec.canonical`).

    Returns:
        :class:`SceneSpec` (``size`` None where the caption does not state it).

    Raises:
        ConfigError: when the caption names no object, or a relation lacks an object on
            either side.
    """
    objects: list[ObjectSpec] = []
    index: dict[tuple[str, str], int] = {}
    relations: list[tuple[int, str, int]] = []
    last: int | None = None
    pending: tuple[int, str] | None = None
    for m in _TOKEN.finditer(text):
        if m.group("mention"):
            colour, shape = m.group("colour").lower(), m.group("shape").lower()
            size = (m.group("size") or m.group("size2") or "").lower() or None
            key = (colour, shape)
            if key in index:
                i = index[key]
                if size is not None and objects[i].size is None:
                    objects[i] = ObjectSpec(shape, colour, size)
            else:
                i = index[key] = len(objects)
                objects.append(ObjectSpec(shape, colour, size))
            if pending is not None:
                relations.append((pending[0], pending[1], i))
                pending = None
            last = i
        else:
            if last is None or pending is not None:
                raise ConfigError(f"caption {text!r}: relation {m.group('rel')!r} has no object before it")
            pending = (last, _REL_PHRASES[m.group("rel").lower()])
    if not objects:
        raise ConfigError(f"caption {text!r}: no object named (a colour and a shape: {', '.join(SHAPES)})")
    if pending is not None:
        raise ConfigError(f"caption {text!r}: the last relation has no object after it")
    return SceneSpec(objects, relations)


# ---------------------------------------------------------------- scoring


def score(image, prompt: SceneSpec | SceneGraph | str, detections: list[Detection] | None = None) -> JudgeScore:
    """Score one image against a prompt.

    Args:
        image: uint8 ``[3, H, W]`` or float ``[3, H, W]`` in [-1, 1].
        prompt: a :class:`SceneSpec`, a :class:`SceneGraph` (its spec) or a caption.
        detections: reuse :func:`detect`'s output for this image.

    Returns:
        the :class:`JudgeScore`; detections are matched to the prompt's objects one to one,
        minimising the number of disagreeing attributes (colour, shape, stated size).
    """
    if isinstance(prompt, str):
        prompt = parse_caption(prompt)
    elif isinstance(prompt, SceneGraph):
        prompt = prompt.spec()
    hwc = _as_hwc_uint8(image)
    h, w, _ = hwc.shape
    dets = detect(image) if detections is None else detections
    objs = prompt.objects
    match: dict[int, Detection] = {}
    if dets and objs:
        cost = np.array([[(o.colour != d.colour) + (o.shape != d.shape)
                          + (o.size is not None and o.size != d.size) for d in dets] for o in objs], float)
        rows, cols = linear_sum_assignment(cost)
        match = {int(r): dets[int(c)] for r, c in zip(rows, cols)}
    colour = sum(1 for i, o in enumerate(objs) if i in match and match[i].colour == o.colour)
    shape = sum(1 for i, o in enumerate(objs) if i in match and match[i].shape == o.shape)
    sized = [i for i, o in enumerate(objs) if o.size is not None]
    size = sum(1 for i in sized if i in match and match[i].size == objs[i].size)
    margin = judge_margin(h, w)
    rel_ok = sum(1 for i, r, j in prompt.relations
                 if i in match and j in match and relation_holds(match[i].centre, match[j].centre, r, margin))
    count_ok = len(dets) == len(objs)
    exact = (count_ok and colour == len(objs) and shape == len(objs) and size == len(sized)
             and rel_ok == len(prompt.relations))
    return JudgeScore(len(objs), colour, shape, size, len(sized), rel_ok, len(prompt.relations),
                      count_ok, exact, dets)


def summarise(scores: Sequence[JudgeScore]) -> dict:
    """Pooled accuracies of many scores: ``colour``, ``shape``, ``size`` (per object),
    ``relation`` (per stated relation; None without any), ``count`` and ``exact`` (per
    image), and ``n`` images."""
    n = len(scores)
    objs = sum(s.num_objects for s in scores)
    sized = sum(s.num_sized for s in scores)
    rels = sum(s.num_relations for s in scores)
    return {
        "n": n,
        "colour": sum(s.colour for s in scores) / max(objs, 1),
        "shape": sum(s.shape for s in scores) / max(objs, 1),
        "size": sum(s.size for s in scores) / max(sized, 1),
        "relation": (sum(s.relations_ok for s in scores) / rels) if rels else None,
        "count": sum(s.count_ok for s in scores) / max(n, 1),
        "exact": sum(s.exact for s in scores) / max(n, 1),
    }
