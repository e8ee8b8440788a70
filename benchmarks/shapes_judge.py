"""Accuracy of the pixel-only shapes judge on rendered scenes, clean and with Gaussian noise.

    python benchmarks/shapes_judge.py [--n 1000] [--sigma 0.05] [--size 64] [--no-write]

Renders the first ``--n`` scenes of the ``val``, ``test`` and ``heldout`` splits of
``flowdit.data.shapes`` at ``--size`` x ``--size``, judges each against its own scene graph,
and reports per-attribute accuracy (colour, shape, size), object accuracy (all three right),
count accuracy, relation accuracy and whole-prompt exact match, overall and by object count.
The noisy rows add i.i.d. Gaussian noise of standard deviation ``--sigma`` (images in [0, 1],
clipped; noise seed 0). Deterministic; about 20 s on one core. Writes
``benchmarks/results/shapes_judge.{json,md}`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from common import machine_info, write_results
from flowdit.data.shapes import render_scene, split_scenes
from flowdit.eval.shapes_judge import judge

KEYS = ("colour", "shape", "size", "object", "count", "relation", "exact")


def evaluate(scenes, size: int, sigma: float) -> dict:
    """Mean of every judge score, overall and per object count."""
    rng = np.random.default_rng(0)
    groups: dict[str, list[dict]] = {"all": [], "1": [], "2": [], "3": []}
    for s in scenes:
        img = render_scene(s, size, size)[0]
        if sigma > 0:
            img = np.clip(img / 255.0 + rng.normal(0.0, sigma, img.shape), 0.0, 1.0)
        r = judge(img, s)
        groups["all"].append(r)
        groups[str(len(s.objects))].append(r)
    return {
        g: {"n": len(rs), **{k: float(np.mean([float(r[k]) for r in rs])) for k in KEYS}}
        for g, rs in groups.items()
        if rs
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="scenes per split")
    ap.add_argument("--sigma", type=float, default=0.05, help="std of the added noise (images in [0, 1])")
    ap.add_argument("--size", type=int, default=64, help="image height and width")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    payload = {"n": args.n, "sigma": args.sigma, "size": args.size, "machine": machine_info(), "results": []}
    head = ["split", "noise", "objects", "n", *KEYS]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for split in ("val", "test", "heldout"):
        scenes = split_scenes(split, args.n)
        for sigma in (0.0, args.sigma):
            res = evaluate(scenes, args.size, sigma)
            payload["results"].append({"split": split, "sigma": sigma, "scores": res})
            for g, r in res.items():
                cells = [split, f"{sigma:g}", g, str(r["n"]), *(f"{100 * r[k]:.2f}" for k in KEYS)]
                rows.append("| " + " | ".join(cells) + " |")
    payload["seconds"] = time.perf_counter() - t0
    table = "\n".join(rows)
    print(table)
    if not args.no_write:
        print(f"wrote {write_results('shapes_judge', payload, table)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
