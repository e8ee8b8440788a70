"""Captioned procedural scenes (flowdit.data.shapes) and their judge (flowdit.eval.shapes_judge)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from flowdit.data import build_dataset, to_float
from flowdit.data import shapes as S
from flowdit.errors import ConfigError, DataError
from flowdit.eval import shapes_judge as J


def test_same_seed_same_bytes_and_seeds_differ():
    a, b = S.make_scene(7, "test", seed=3), S.make_scene(7, "test", seed=3)
    assert a.image.tobytes() == b.image.tobytes() and a.masks.tobytes() == b.masks.tobytes()
    assert a.captions == b.captions and a.graph == b.graph
    assert S.make_scene(7, "test", seed=4).image.tobytes() != a.image.tobytes()
    assert S.make_scene(7, "val", seed=3).image.tobytes() != a.image.tobytes()
    s1, s2 = S.train_stream(4, seed=1), S.train_stream(4, seed=1)
    for _ in range(2):
        x, y = next(s1), next(s2)
        assert x.images.dtype == torch.uint8 and x.images.shape == (4, 3, 64, 64)
        assert torch.equal(x.images, y.images) and x.captions == y.captions
        assert all(c in cs for c, cs in zip(x.captions, x.all_captions))
    # A resumed stream repeats the batches from where it starts.
    resumed = next(S.train_stream(4, seed=1, start=4))
    again = S.train_stream(4, seed=1)
    next(again)
    assert torch.equal(next(again).images, resumed.images)


def test_every_caption_parses_back_to_its_graph():
    for i in range(200):
        g = S.scene_graph(i, "train")
        want = g.spec().canonical()
        caps = S.captions(g)
        assert len(caps) >= 3 and len(set(caps)) == len(caps)
        for c in caps:
            assert J.parse_caption(c).canonical() == want, c


def test_parse_caption_of_user_prompts():
    spec = J.parse_caption("A large red circle above a blue star")
    assert spec.objects == [S.ObjectSpec("circle", "red", "large"), S.ObjectSpec("star", "blue", None)]
    assert spec.relations == [(0, "above", 1)]
    spec = J.parse_caption("a blue star right of a small red circle")
    assert spec.canonical() == S.SceneSpec([S.ObjectSpec("circle", "red", "small"), S.ObjectSpec("star", "blue")],
                                           [(1, "right", 0)]).canonical()
    assert J.parse_caption("red circle, small, left of a blue star").objects[0].size == "small"
    with pytest.raises(ConfigError, match="no object"):
        J.parse_caption("a purple unicorn")
    with pytest.raises(ConfigError, match="no object after"):
        J.parse_caption("a red circle left of")


def test_relations_hold_with_a_margin_and_objects_do_not_touch():
    for i in range(60):
        sc = S.make_scene(i, "test", height=64, width=80)
        g = sc.graph
        masks = sc.masks
        assert masks.shape == (len(g.objects), 64, 80) and masks.any(axis=(1, 2)).all()
        gap = int(S.min_gap_px(64, 80))
        grown = [ndimage.binary_dilation(m, iterations=gap - 1) for m in masks]
        for a in range(len(masks)):
            for b in range(a + 1, len(masks)):
                assert not (grown[a] & masks[b]).any()
        for a, rel, b in g.relations:
            oa, ob = g.objects[a], g.objects[b]
            # The stated relation is the one read off the centres, by a wide margin.
            assert S.geometric_relation(oa.centre, ob.centre, margin=6.0) == rel
            ax = 0 if rel in ("left", "right") else 1
            d = np.subtract(ob.centre, oa.centre)
            assert abs(d[ax]) >= 2 * abs(d[1 - ax])


def test_heldout_compositions_never_appear_in_training():
    pairs = set(S.HELDOUT_PAIRS)
    top, rel, bottom = S.HELDOUT_RELATION
    seen_colours, seen_shapes = set(), set()
    for i in range(3000):
        g = S.scene_graph(i, "train")
        for o in g.objects:
            assert (o.colour, o.shape) not in pairs
            seen_colours.add(o.colour)
            seen_shapes.add(o.shape)
        for a in g.objects:
            for b in g.objects:
                if a.shape == top and b.shape == bottom:
                    assert S.geometric_relation(a.centre, b.centre) != rel
    # Every colour and shape is still seen, only the pairs are not.
    assert seen_colours == set(S.COLOURS) and seen_shapes == set(S.SHAPES)
    for i in range(200):
        g = S.scene_graph(i, "heldout")
        has_pair = any((o.colour, o.shape) in pairs for o in g.objects)
        has_rel = any(g.objects[a].shape == top and g.objects[b].shape == bottom and r == rel
                      for a, r, b in g.relations)
        assert has_pair or has_rel


def test_judge_exact_match_on_rendered_test_scenes():
    scores = [J.score(s.image, s.graph) for s in S.scene_set("test", 300)]
    summary = J.summarise(scores)
    assert summary["exact"] >= 0.99, summary
    assert min(summary["colour"], summary["shape"], summary["size"], summary["relation"]) >= 0.99


def _other(values, used):
    return next(v for v in values if v not in used)


def test_judge_catches_a_wrong_colour_shape_size_or_an_extra_object():
    n = 0
    for i in range(40):
        sc = S.make_scene(i, "test")
        g = sc.graph
        if not J.score(sc.image, g).exact:
            continue
        n += 1
        names = {(o.colour, o.shape) for o in g.objects}
        # Recolour object 0.
        bad = dataclasses.replace(g, objects=[dataclasses.replace(o) for o in g.objects])
        o = bad.objects[0]
        o.colour = _other(S.COLOURS, {c for c, s in names if s == o.shape} | {o.colour})
        r = J.score(S.render(bad)[0], g)
        assert not r.exact and r.colour == len(g.objects) - 1
        # Swap its shape (same box centre and size).
        bad = dataclasses.replace(g, objects=[dataclasses.replace(o) for o in g.objects])
        o = bad.objects[0]
        o.shape = _other(S.SHAPES, {s for c, s in names if c == o.colour} | {o.shape})
        o.bbox = S.object_bbox(o)
        r = J.score(S.render(bad)[0], g)
        assert not r.exact and r.shape == len(g.objects) - 1
        # Recolour its pixels in the image itself.
        img = sc.image.copy()
        img[:, sc.masks[0]] = np.array(S.COLOURS[_other(S.COLOURS, {c for c, _ in names})], np.uint8)[:, None]
        assert not J.score(img, g).exact
    assert n >= 38
    # An extra object: a three-object scene scored against its first two objects.
    k = 0
    for i in range(60):
        sc = S.make_scene(i, "test")
        g = sc.graph
        if len(g.objects) != 3:
            continue
        k += 1
        fewer = S.SceneSpec([S.ObjectSpec(o.shape, o.colour, o.size) for o in g.objects[:2]], g.relations[:1])
        r = J.score(sc.image, fewer)
        assert not r.count_ok and not r.exact
        # A missing object too.
        r = J.score(sc.image, S.SceneSpec(g.spec().objects + [S.ObjectSpec("ring", "white", "large")]))
        assert not r.exact
    assert k >= 5
    # A blank image matches nothing.
    blank = np.full((3, 64, 64), 128, np.uint8)
    assert J.detect(blank) == [] and not J.score(blank, "a small red circle").exact


def test_any_size_renders_and_is_judged():
    for h, w in ((40, 100), (100, 40), (33, 77), (64, 64)):
        sc = S.make_scene(3, "test", height=h, width=w)
        assert sc.image.shape == (3, h, w) and sc.image.dtype == np.uint8
        assert sc.masks.shape == (len(sc.graph.objects), h, w) and sc.masks.dtype == bool
    ok = [J.score(s.image, s.graph).exact for s in S.scene_set("test", 30, height=80, width=120)]
    assert sum(ok) >= 29
    # Float images in [-1, 1] are judged as their uint8 rounding.
    sc = S.make_scene(1, "test")
    assert J.score(to_float(torch.from_numpy(sc.image)), sc.graph).exact
    with pytest.raises(DataError, match="at least 32x32"):
        S.make_scene(0, "test", height=16, width=64)


def test_build_dataset_shapes(monkeypatch):
    monkeypatch.setitem(S.DATASET_SIZES, "val", 12)
    ds = build_dataset("shapes", split="val", image_size=48)
    assert isinstance(ds, S.ShapesDataset) and ds.images.shape == (12, 3, 48, 48)
    assert ds.num_classes == len(S.CLASS_NAMES) == 72 and ds.split == "val"
    assert len(ds.graphs) == len(ds.captions) == len(ds.masks) == 12
    for lab, g in zip(ds.labels.tolist(), ds.graphs):
        assert ds.class_names[lab] == g.objects[0].name
    x, y = ds.batch(torch.arange(3))
    assert x.shape == (3, 3, 48, 48) and x.min() >= -1 and y.dtype == torch.int64
    assert torch.equal(ds.images[5], torch.from_numpy(S.make_scene(5, "val", height=48, width=48).image))
    with pytest.raises(DataError, match="unknown split"):
        build_dataset("shapes", split="all")
    with pytest.raises(DataError, match="3 channels"):
        build_dataset("shapes", channels=1)


def test_captioned_grid(tmp_path):
    from PIL import Image

    from flowdit.utils.images import save_captioned_grid

    scenes = S.scene_set("test", 3)
    imgs = to_float(torch.from_numpy(np.stack([s.image for s in scenes])))
    path = save_captioned_grid(imgs, [s.captions[0] for s in scenes], tmp_path / "g.png", nrow=3)
    pic = Image.open(path)
    assert pic.mode == "RGB" and pic.size[0] == 3 * (128 + 4) + 4 and pic.size[1] > 128
    with pytest.raises(DataError, match="captions"):
        save_captioned_grid(imgs, ["one"], tmp_path / "h.png")
