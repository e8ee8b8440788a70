"""The shapes judge's own accuracy on rendered scenes, clean and mildly degraded.

    python benchmarks/shapes_judge.py [--n 1000] [--seed 0] [--no-write]

Renders the fixed ``test`` (and ``heldout``) scenes of ``flowdit.data.shapes`` and scores
each image against its own scene graph with ``flowdit.eval.shapes_judge.score``: a perfect
judge gets 100% everywhere. Rows: the test split at 64x64 (all, by background, by object
count), the held-out split, other image sizes (H x W), and degradations a generator
produces, applied to the float image in [-1, 1] before saving as uint8 (Gaussian noise of
sigma 0.05, 0.1 and 0.2, a Gaussian blur of sigma 0.5, 0.8 and 1.2 px, noise and blur
together); the strongest settings are there to show where the judge stops working.
Writes ``benchmarks/results/shapes_judge.{json,md}`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import numpy as np
from scipy import ndimage

from common import machine_info, write_results
from flowdit.data.shapes import scene_set
from flowdit.eval.shapes_judge import score, shape_classifier, summarise


def degrade(image: np.ndarray, rng: np.random.Generator, noise: float = 0.0, blur: float = 0.0) -> np.ndarray:
    """uint8 [3, H, W] -> blurred (sigma px), then noised (sigma in [-1, 1] units), uint8."""
    x = image.astype(np.float64) / 127.5 - 1.0
    if blur > 0:
        x = ndimage.gaussian_filter(x, sigma=(0, blur, blur), mode="nearest")
    if noise > 0:
        x = x + rng.normal(0.0, noise, x.shape)
    return np.rint((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)


def run_cell(scenes, noise=0.0, blur=0.0, seed=0, key=None):
    rng = np.random.default_rng([seed, 99])
    scores = []
    for s in scenes:
        img = s.image if noise == 0 and blur == 0 else degrade(s.image, rng, noise, blur)
        scores.append((s, score(img, s.graph)))
    groups = {"all": [sc for _, sc in scores]}
    if key is not None:
        for s, sc in scores:
            groups.setdefault(key(s), []).append(sc)
    return {k: summarise(v) for k, v in groups.items()}


def pct(v):
    return "-" if v is None else f"{100 * v:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="scenes per cell")
    ap.add_argument("--seed", type=int, default=0, help="seed of the scene sets")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    shape_classifier()
    fit_s = time.perf_counter() - t0

    rows = []  # (setting, group, summary)
    test64 = scene_set("test", args.n, args.seed, 64, 64)
    by_bg = run_cell(test64, key=lambda s: f"background {s.graph.background}")
    by_k = run_cell(test64, key=lambda s: f"{len(s.graph.objects)} object(s)")
    rows.append(("test 64x64", "all", by_bg["all"]))
    rows += [("test 64x64", g, v) for g, v in sorted(by_bg.items()) if g != "all"]
    rows += [("test 64x64", g, v) for g, v in sorted(by_k.items()) if g != "all"]
    rows.append(("heldout 64x64", "all", run_cell(scene_set("heldout", args.n, args.seed, 64, 64))["all"]))
    for h, w in ((48, 48), (64, 96), (96, 64), (128, 128)):
        rows.append((f"test {h}x{w}", "all", run_cell(scene_set("test", args.n, args.seed, h, w))["all"]))
    for noise, blur in ((0.05, 0.0), (0.1, 0.0), (0.2, 0.0), (0.0, 0.5), (0.0, 0.8), (0.0, 1.2), (0.05, 0.5)):
        what = " + ".join(x for x in (f"noise {noise}" if noise else "", f"blur {blur} px" if blur else "") if x)
        rows.append((f"test 64x64, {what}", "all", run_cell(test64, noise, blur, args.seed)["all"]))
    total_s = time.perf_counter() - t0

    head = "| setting | scenes | n | colour | shape | size | relation | count | exact match |"
    lines = [head, "|" + " --- |" * 9]
    for setting, group, v in rows:
        lines.append(f"| {setting} | {group} | {v['n']} | {pct(v['colour'])} | {pct(v['shape'])} | "
                     f"{pct(v['size'])} | {pct(v['relation'])} | {pct(v['count'])} | **{pct(v['exact'])}** |")
    table = "\n".join(lines)
    command = "python benchmarks/shapes_judge.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    machine = machine_info()
    table += (f"\n\nPer cent of rendered scenes (scored against their own graphs); colour, shape, size "
              f"per object, relation per stated relation, count and exact match per image. "
              f"Classifier fit {fit_s:.1f} s, whole run {total_s:.0f} s. Command: `{command.strip()}`.")
    print(table)
    payload = {"command": command.strip(), "machine": machine, "n": args.n, "seed": args.seed,
               "fit_seconds": fit_s, "total_seconds": total_s,
               "rows": [{"setting": s, "group": g, **v} for s, g, v in rows]}
    if not args.no_write:
        print(f"wrote {write_results('shapes_judge', payload, table)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
