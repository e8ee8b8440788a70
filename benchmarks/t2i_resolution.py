"""Text-to-image at sizes other than trained: judge accuracy and exact match at 2x the side,
at 1:2 and 2:1 and smaller, for each RoPE extrapolation method, with and without
proportional attention and SD3's resolution-dependent time shift, against the native size.

    python benchmarks/t2i_resolution.py --run runs/shapes-flux [--n 150]
        [--sizes 64x64,128x128,64x128,128x64,48x48] [--methods none,linear,ntk,yarn,lumina,lumina_watershed]
        [--sincos-run runs/shapes-mmdit] [--name t2i_resolution]

Prompts are the first caption of the fixed ``test`` scenes (rendered at 64 x 64); every
cell judges the same prompts with the same noise seeds, so cells differ only in size and
method. For the native size only ``none`` runs (every method is the identity there).
"Shift" multiplies the run's shift by ``resolution_shift(tokens, trained tokens)``
(``sqrt(m / n)``, SD3 eq. 23). The judge's own accuracy on renders of the same scenes at
each size is measured first, so a drop is the model's. ``--sincos-run`` adds the
sin-cos MMDiT (no RoPE: its embedding is evaluated on the larger grid) as a baseline.
Writes ``benchmarks/results/<name>.{json,md}`` after every cell.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import finish, markdown_table, pct
from flowdit.core.timesteps import resolution_shift
from flowdit.data.shapes import render, scene_graph
from flowdit.eval.shapes_judge import score, summarise
from flowdit.inference.text import load_text_run
from flowdit.train.text_outputs import evaluation_prompts, judge_prompts
from flowdit.utils.precision import autocast_dtype


def _size(spec: str) -> tuple[int, int]:
    h, w = spec.lower().split("x")
    return int(h), int(w)


def judge_on_renders(n: int, height: int, width: int) -> float:
    """Exact match of the judge on ``n`` test scenes rendered at ``height x width``."""
    scores = []
    for i in range(n):
        g = scene_graph(i, "test", 0, height, width)
        img, _ = render(g)
        scores.append(score(img, g))  # render gives uint8 [3, H, W]
    return summarise(scores)["exact"]


def _tokens(run, height, width) -> int:
    """Image tokens of one sample at ``height x width`` pixels (``None``: the trained size)."""
    _, h, w = run.sample_shape(height, width)
    p = run.model.config.patch_size
    return (h // p) * (w // p)


def _row(model_name, size, method, pa, shift, a, sec, native_exact):
    keep = a["exact"] / native_exact if native_exact else None
    return {"model": model_name, "size": size, "method": method, "proportional_attn": pa, "shift": shift,
            "judge": a, "seconds_per_image": sec, "exact_vs_native": keep}


def _table(rows, render_acc) -> str:
    head = ("| model | size (H x W) | RoPE scaling | prop. attn | shift | exact | of native | 1 obj | 2 obj | colour "
            "| shape | count | relation | judge on renders | s / image |")
    lines = []
    for r in rows:
        a = r["judge"]
        keep = "" if r["exact_vs_native"] is None else f"{100 * r['exact_vs_native']:.0f}%"
        lines.append(
            f"| {r['model']} | {r['size']} | {r['method']} | {'yes' if r['proportional_attn'] else 'no'} | "
            f"{r['shift']:.2f} | {pct(a['exact'])} | {keep} | {pct(a.get('objects_1', {}).get('exact'))} | "
            f"{pct(a.get('objects_2', {}).get('exact'))} | {pct(a['colour'])} | {pct(a['shape'])} | "
            f"{pct(a['count'])} | {pct(a['relation'])} | {pct(render_acc.get(r['size']))} | "
            f"{r['seconds_per_image']:.3f} |")
    return markdown_table(head, lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="text-to-image run with RoPE (e.g. FLUX-shapes)")
    ap.add_argument("--n", type=int, default=150, help="test prompts per cell")
    ap.add_argument("--sizes", default="64x64,128x128,64x128,128x64,48x48",
                    help="pixel sizes H x W; the first is the native one")
    ap.add_argument("--methods", default="none,linear,ntk,yarn,lumina,lumina_watershed")
    ap.add_argument("--aspect-methods", default="none,ntk,yarn",
                    help="methods at sizes other than the first two (keeps the run short)")
    ap.add_argument("--shift-methods", default="none,ntk,yarn",
                    help="methods also run with the resolution shift (with proportional attention)")
    ap.add_argument("--sincos-run", help="a sin-cos MMDiT run of the same data, as a baseline at each size")
    ap.add_argument("--steps", type=int, default=None, help="default: the run's sample.steps")
    ap.add_argument("--cfg", type=float, default=None, help="default: the run's sample.cfg")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="t2i_resolution")
    ap.add_argument("--figure", help="PNG of the first four prompts in every square cell")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    sizes = [_size(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",")
    aspect_methods = args.aspect_methods.split(",")
    shift_methods = args.shift_methods.split(",")
    run = load_text_run(args.run)
    amp = autocast_dtype("auto", torch.device("cpu"))
    sc = run.meta["config"]["sample"]
    steps = args.steps or int(sc["steps"])
    cfg = args.cfg if args.cfg is not None else float(sc["cfg"])
    prompts, graphs = evaluation_prompts("test", args.n)
    render_acc = {f"{h}x{w}": judge_on_renders(args.n, h, w) for h, w in sizes}
    print("judge on renders:", {k: pct(v) for k, v in render_acc.items()}, flush=True)
    base_tokens = _tokens(run, None, None)
    rows: list[dict] = []
    payload = {"run_config": run.meta["config"], "rows": rows, "prompts": args.n, "steps": steps, "cfg": cfg,
               "judge_on_renders": render_acc}
    native = {}
    shown: list[tuple[str, torch.Tensor]] = []
    run_name = run.meta["config"]["model"]["name"]

    def cell(r, name, h, w, method, pa, shift_on):
        shift = r.shift * (resolution_shift(_tokens(r, h, w), base_tokens) if shift_on else 1.0)
        if r.model.config.pos_embed == "rope":
            r.model.set_extrapolation(rope_scaling=method, proportional_attn=pa)
        saved, r.shift = r.shift, shift
        t0 = time.perf_counter()
        try:
            a, imgs, sec = judge_prompts(r, prompts, graphs, solver="euler", steps=steps, cfg_scale=cfg, amp_dtype=amp,
                                      seed=args.seed, height=h, width=w)
        finally:
            r.shift = saved
        size = f"{h}x{w}"
        if (h, w) == sizes[0] and method == "none" and not pa and not shift_on:
            native[name] = a["exact"]
        rows.append(_row(name, size, method, pa, shift, a, sec, native.get(name)))
        if h == w and not pa and not shift_on:
            shown.append((f"{size} {method}" if name == run_name else f"{size} {name}", imgs[:4]))
        print(f"{name} {size} {method} pa={pa} shift={shift:.2f}: exact {pct(a['exact'])} "
              f"(1 obj {pct(a.get('objects_1', {}).get('exact'))}), colour {pct(a['colour'])}, "
              f"count {pct(a['count'])} [{time.perf_counter() - t0:.0f} s]", flush=True)
        finish(args.name, "t2i_resolution.py", argv, payload, _table(rows, render_acc), not args.no_write)

    name = run.meta["config"]["model"]["name"]
    if run.model.config.pos_embed != "rope":
        raise SystemExit(f"--run {args.run}: needs RoPE positions (a sin-cos run goes in --sincos-run)")
    h0, w0 = sizes[0]
    cell(run, name, h0, w0, "none", False, False)
    for i, (h, w) in enumerate(sizes[1:], start=1):
        ms = methods if i == 1 else aspect_methods
        grid = [(m, pa, False) for m in ms for pa in (False, True)]
        if h * w > h0 * w0:
            grid += [(m, True, True) for m in ms if m in shift_methods]
        for m, pa, sh in grid:
            if h * w < h0 * w0 and m != "none":
                continue  # smaller than trained: the scalings leave the frequencies as trained
            cell(run, name, h, w, m, pa, sh)
    if args.sincos_run:
        base = load_text_run(args.sincos_run)
        bname = base.meta["config"]["model"]["name"]
        for h, w in sizes:
            for sh in ((False, True) if h * w > h0 * w0 else (False,)):
                cell(base, bname, h, w, "none", False, sh)
    if args.figure:
        save_figure(shown, args.figure)
    return 0


def save_figure(shown, path: str) -> None:
    """One row per square cell (plain attention, no shift), the first four prompts, every
    image resized (nearest) to the largest side so sizes compare at a glance."""
    import torch.nn.functional as F

    from flowdit.utils.images import save_captioned_grid

    side = max(x.shape[-1] for _, x in shown)
    imgs = torch.cat([F.interpolate(x, size=(side, side), mode="nearest") for _, x in shown])
    captions = [label for label, x in shown for _ in range(len(x))]
    save_captioned_grid(imgs, captions, path, nrow=len(shown[0][1]))
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
