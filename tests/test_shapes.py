"""Captioned procedural scenes and their pixel-only judge."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flowdit.data.shapes import (
    COLOURS,
    HELDOUT_PAIRS,
    SHAPES,
    Scene,
    graph_signature,
    random_scene,
    relation_between,
    render_scene,
    scene_seed,
    split_scenes,
    train_stream,
)
from flowdit.errors import ConfigError, DataError
from flowdit.eval.shapes_judge import judge, parse_caption


def test_deterministic():
    a, b = split_scenes("test", 20), split_scenes("test", 20)
    assert a == b
    assert split_scenes("val", 20) != a
    for s in a[:5]:
        assert np.array_equal(render_scene(s)[0], render_scene(s)[0])
    x = [next(iter(train_stream(seed=3)))[0] for _ in range(2)]
    assert np.array_equal(x[0], x[1])
    assert random_scene(scene_seed("train", 7)) == random_scene(scene_seed("train", 7))


def test_heldout_pairs_never_in_train():
    for split, n in (("train", 2000), ("val", 300), ("test", 300)):
        for s in split_scenes(split, n):
            assert not any((o.colour, o.shape) in HELDOUT_PAIRS for o in s.objects)
    held = split_scenes("heldout", 200)
    assert all(any((o.colour, o.shape) in HELDOUT_PAIRS for o in s.objects) for s in held)
    assert {c for c, _ in HELDOUT_PAIRS} <= set(COLOURS) and {s for _, s in HELDOUT_PAIRS} <= set(SHAPES)


def test_scene_invariants():
    for s in split_scenes("train", 300):
        assert 1 <= len(s.objects) <= 3
        keys = [(o.colour, o.shape) for o in s.objects]
        assert len(set(keys)) == len(keys)  # captions are unambiguous
        for i, r, j in s.relations:
            assert relation_between(s.objects[i].centre, s.objects[j].centre) == r
        img, masks = render_scene(s)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert masks.shape == (len(s.objects), 64, 64)
        assert not (masks.sum(0) > 1).any()  # no overlap
        assert all(m.sum() >= 30 for m in masks)
    img, masks = render_scene(split_scenes("test", 1)[0], 48, 96)
    assert img.shape == (48, 96, 3) and masks.shape[1:] == (48, 96)


def test_captions_parse_back():
    for s in split_scenes("test", 100):
        caps = s.captions()
        assert len(set(caps)) == len(caps)
        for c in caps:
            assert graph_signature(parse_caption(c)) == graph_signature(s)
    s = split_scenes("test", 50)
    two = next(x for x in s if len(x.objects) == 2)
    a, b = two.objects
    r = two.relations[0][1]
    assert f"{a.phrase()} {'to the ' + r if 'of' in r else r} {b.phrase()}" in two.captions()
    with pytest.raises(DataError):
        parse_caption("a small purple circle")


def test_judge_accuracy_on_rendered_scenes():
    scenes = split_scenes("test", 300)
    exact = [judge(render_scene(s)[0], s)["exact"] for s in scenes]
    assert np.mean(exact) >= 0.99


def _first(n_objects: int) -> Scene:
    return next(s for s in split_scenes("test", 100) if len(s.objects) == n_objects and s.relations)


def test_judge_rejects_wrong_images():
    s = _first(2)
    img = render_scene(s)[0]
    assert judge(img, s)["exact"]
    a = s.objects[0]
    b = (s.objects[1].colour, s.objects[1].shape)
    other_colour = next(c for c in COLOURS if c != a.colour and (c, a.shape) != b)
    other_shape = next(x for x in SHAPES if x != a.shape and (a.colour, x) != b)
    for changed in (dataclasses.replace(a, colour=other_colour), dataclasses.replace(a, shape=other_shape),
                    dataclasses.replace(a, size="small" if a.size == "large" else "large")):  # fmt: skip
        wrong = Scene(objects=(changed, s.objects[1]), relations=s.relations)
        # an image of the altered scene, judged against the original prompt
        r = judge(render_scene(wrong)[0], s)
        assert not r["exact"] and r["object"] == 0.5
    # an extra object: image of a three-object scene against a prompt of its first two objects
    s3 = _first(3)
    r = judge(render_scene(s3)[0], Scene(objects=s3.objects[:2], relations=s3.relations[:1]))
    assert not r["count"] and not r["exact"]
    # a swapped relation: the objects exchange places
    o0, o1 = s.objects
    moved = (dataclasses.replace(o0, centre=o1.centre), dataclasses.replace(o1, centre=o0.centre))
    swapped = Scene(objects=moved, relations=s.relations)
    r = judge(render_scene(swapped)[0], s)
    assert r["relation"] == 0.0 and not r["exact"]
    # a blank image
    r = judge(np.full((64, 64, 3), 40, np.uint8), s)
    assert r["colour"] == 0.0 and not r["count"]


def test_bad_arguments():
    with pytest.raises(ConfigError):
        random_scene(np.random.default_rng(0), 4)
    with pytest.raises(ConfigError):
        split_scenes("nope", 3)


def test_judge_other_sizes_and_float_input():
    for s in split_scenes("val", 20):
        img = render_scene(s, 64, 128)[0]
        assert judge(img, s)["exact"]
        assert judge(img.astype(np.float32) / 255.0, s)["exact"]
