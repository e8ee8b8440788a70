"""Prompt editing of rendered scenes with a text-to-image run: recolour one object by
inverting under the source prompt and regenerating under the target prompt (RF-Edit's
value sharing for the first ``inject`` steps), for Euler, RF-Solver and FireFlow
inversion, and RF-Inversion.

    python benchmarks/t2i_edit.py --run runs/shapes-mmdit [--n 200] [--steps 16]
        [--injects 0,1,2,4] [--cfg 4] [--name t2i_edit]

Scene ``i`` of the fixed ``test`` split (1 or 2 objects) is encoded by the run's
autoencoder; its first object's colour is changed to the first colour of
``flowdit.data.shapes.COLOURS`` (after its own) that no other object of the scene has and
that does not make a held-out pair. Columns: the judge's exact match against the
*target* scene (edit made, everything else kept at the judge's level: shapes, sizes,
other colours, relations), against the *source* scene (edit not made), the edited
object's colour accuracy, and the PSNR outside every object's mask (dilated by 2 px)
between the source render and the edit (how much of the background survived).
Writes ``benchmarks/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from scipy import ndimage

from common import finish, markdown_table, pct
from flowdit.data.shapes import COLOURS, HELDOUT_PAIRS, captions, make_scene
from flowdit.edit.rf_edit import rf_edit
from flowdit.edit.rf_inversion import rf_inversion
from flowdit.eval.shapes_judge import score, summarise
from flowdit.inference.text import encode_prompts, load_text_run
from flowdit.utils.precision import autocast_dtype


def edit_pairs(n: int):
    """``n`` (scene, target graph) pairs from the test split, 1-2 objects."""
    out, i = [], 0
    while len(out) < n:
        s = make_scene(i, "test")
        i += 1
        if len(s.graph.objects) > 2:
            continue
        o = s.graph.objects[0]
        used = {x.colour for x in s.graph.objects}
        names = list(COLOURS)
        start = names.index(o.colour)
        new = next(c for c in names[start + 1:] + names[:start]
                   if c not in used and (c, o.shape) not in HELDOUT_PAIRS)
        objs = [dataclasses.replace(o, colour=new)] + list(s.graph.objects[1:])
        out.append((s, dataclasses.replace(s.graph, objects=objs)))
    return out


def background_psnr(src: np.ndarray, edited: torch.Tensor, masks: np.ndarray) -> float:
    """PSNR (dB, range [-1, 1]) over pixels outside every object's mask dilated by 2 px."""
    keep = ~ndimage.binary_dilation(masks.any(0), iterations=2)
    a = torch.from_numpy(src).float() / 127.5 - 1
    mse = float(((a - edited.clamp(-1, 1)) ** 2)[:, torch.from_numpy(keep)].mean())
    return 10 * np.log10(4.0 / max(mse, 1e-12))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--injects", default="0,1,2,4")
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--solvers", default="euler,rf2,fireflow")
    ap.add_argument("--name", default="t2i_edit")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    run = load_text_run(args.run)
    if run.space is None:
        raise SystemExit("t2i_edit needs a latent run (its autoencoder encodes the scenes)")
    amp = autocast_dtype("auto", torch.device("cpu"))
    pairs = edit_pairs(args.n)
    images = torch.stack([torch.from_numpy(s.image) for s, _ in pairs]).float() / 127.5 - 1
    with torch.no_grad():
        z = torch.cat([run.space.encode(images[i:i + 100]) for i in range(0, len(images), 100)])
    src = encode_prompts(run.encoder, [captions(s.graph)[0] for s, _ in pairs])
    tgt = encode_prompts(run.encoder, [captions(g)[0] for _, g in pairs])
    null = encode_prompts(run.encoder, [""] * len(pairs))

    def evaluate(latents):
        with torch.no_grad():
            x = torch.cat([run.space.decode(latents[i:i + 100]).float() for i in range(0, len(latents), 100)]).clamp(-1, 1)
        to_target = [score(x[i], g) for i, (_, g) in enumerate(pairs)]
        to_source = [score(x[i], s.graph) for i, (s, _) in enumerate(pairs)]
        # The edited object's colour: a one-object scene's colour accuracy, or the first
        # object's through the judge's matching against the target.
        recolour = float(np.mean([any(d.colour == g.objects[0].colour and d.shape == g.objects[0].shape
                                      for d in t.detections) for t, (_, g) in zip(to_target, pairs)]))
        bg = float(np.mean([background_psnr(s.image, x[i], s.masks) for i, (s, _) in enumerate(pairs)]))
        return {"target": summarise(to_target), "source": summarise(to_source), "recoloured": recolour,
                "background_psnr": bg}

    rows = []
    for solver in args.solvers.split(","):
        for k in [int(v) for v in args.injects.split(",")]:
            t0 = time.perf_counter()
            res = rf_edit(run.model, z, src, tgt, inject_steps=k, solver=solver, steps=args.steps, shift=run.shift,
                          cfg_scale=args.cfg, amp_dtype=amp, negative=null)
            row = {"method": f"RF-Edit ({solver} inversion)", "solver": solver, "inject": k, **evaluate(res.images),
                   "seconds_per_image": (time.perf_counter() - t0) / len(pairs)}
            rows.append(row)
            print(f"{row['method']} inject {k}: target exact {pct(row['target']['exact'])}, source exact "
                  f"{pct(row['source']['exact'])}, recoloured {pct(row['recoloured'])}, "
                  f"bg PSNR {row['background_psnr']:.2f}", flush=True)
    for eta in (0.5, 0.9):
        t0 = time.perf_counter()
        res = rf_inversion(run.model, z, src, tgt, gamma=0.5, eta=eta, eta_steps=(0, args.steps // 4), solver="euler",
                           steps=args.steps, shift=run.shift, cfg_scale=args.cfg, amp_dtype=amp, negative=null)
        row = {"method": f"RF-Inversion (eta {eta}, gamma 0.5)", "solver": "euler", "inject": None,
               **evaluate(res.images), "seconds_per_image": (time.perf_counter() - t0) / len(pairs)}
        rows.append(row)
        print(f"{row['method']}: target exact {pct(row['target']['exact'])}, recoloured {pct(row['recoloured'])}, "
              f"bg PSNR {row['background_psnr']:.2f}", flush=True)
    head = ("| method | injected steps | target exact | source exact | recoloured | target colour | target shape "
            "| target relation | background PSNR (dB) | s / image |")
    lines = []
    for r in rows:
        lines.append(f"| {r['method']} | {'-' if r['inject'] is None else r['inject']} | {pct(r['target']['exact'])} | "
                     f"{pct(r['source']['exact'])} | {pct(r['recoloured'])} | {pct(r['target']['colour'])} | "
                     f"{pct(r['target']['shape'])} | {pct(r['target']['relation'])} | {r['background_psnr']:.2f} | "
                     f"{r['seconds_per_image']:.3f} |")
    table = markdown_table(head, lines)
    payload = {"steps": args.steps, "cfg": args.cfg, "n": args.n, "rows": rows}
    finish(args.name, "t2i_edit.py", argv, payload, table, not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
