"""The report of an acceleration benchmark: quality per row, the comparison with the
fewer-steps baseline, the Markdown table, the Pareto plot and the result files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from flowdit.utils.files import atomic_write_text

__all__ = ["interp", "paired", "plot", "quality", "score_rows", "table_lines", "write_report", "write_results"]


def quality(row, labels, seeds, dataset, root, reference) -> None:
    """Add FID (mean, std and per seed), class accuracy, PSNR and SSIM (means over seeds) to ``row``."""
    from flowdit.eval.pixel import psnr, ssim
    from flowdit.evaluate import evaluate_samples

    fid, acc, ps, ss = [], [], [], []
    for i, (s, img) in enumerate(zip(seeds, row.pop("_images"))):
        r = evaluate_samples(img, labels, dataset, root=root, seed=s)
        fid.append(r["fid"])
        acc.append(r["class_accuracy"])
        if reference is not None:
            p = psnr(img, reference[i])
            ps.append(float(p.clamp(max=100.0).mean()))
            ss.append(float(ssim(img, reference[i]).mean()))
    row["fid_per_seed"] = fid
    row["fid"] = statistics.fmean(fid)
    row["fid_std"] = statistics.stdev(fid) if len(fid) > 1 else 0.0
    row["class_accuracy"] = statistics.fmean(acc)
    row["psnr"] = statistics.fmean(ps) if ps else None
    row["ssim"] = statistics.fmean(ss) if ss else None


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and std over seeds of the per-seed differences ``a - b``."""
    d = [x - y for x, y in zip(a, b)]
    return statistics.fmean(d), (statistics.stdev(d) if len(d) > 1 else 0.0)


def interp(x: float, pts: list[tuple[float, float]]) -> float | None:
    """Linear interpolation of the curve ``pts`` (``(x, y)`` pairs, any order) at ``x``; None outside it."""
    pts = sorted(pts)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def plot(rows, path: Path) -> None:
    """Pareto plot: FID against block GFLOPs per image, and against the wall-clock speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    base = sorted((r for r in rows if r["kind"] != "cache"), key=lambda r: r["gflops_per_image"])
    caches = [r for r in rows if r["kind"] == "cache"]
    for ax, key, label in ((axes[0], "gflops_per_image", "block GFLOPs / image"),
                           (axes[1], "speedup", "wall-clock speedup vs uncached")):
        ax.plot([r[key] for r in base], [r["fid"] for r in base], "k-o", ms=4, label="uncached, fewer steps")
        for i, r in enumerate(caches):
            ax.plot(r[key], r["fid"], marker="os^Dv<>p*hX"[i % 11], ls="", color=f"C{i % 10}", label=r["method"])
        # log scale only when a broken method's FID is many times the others'
        fids = [r["fid"] for r in rows]
        ax.set(xlabel=label, ylabel="FID (evaluator features)", yscale="log" if max(fids) > 3 * min(fids) else "linear")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_xscale("log")
    axes[0].invert_xaxis()
    axes[1].legend(fontsize=6, loc="best")
    fig.suptitle("Training-free acceleration: FID against compute; points below the black curve beat running fewer steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def score_rows(rows: list[dict], labels, seeds: list[int], dataset: str, root) -> None:
    """Add quality, speedup, compute and the comparisons to every row, in place.

    ``rows[0]`` is the uncached reference; rows of kind ``"cache"`` are compared with the
    curve of the other rows (the uncached sampler at fewer steps) at the same FLOPs and at
    the same wall-clock speedup; FID differences are paired by seed.
    """
    ref = rows[0]
    reference = list(ref["_images"])
    for r in rows:
        quality(r, labels, seeds, dataset, root, reference)
        r["speedup"] = ref["seconds"] / r["seconds"]
        per_seed = [a / b for a, b in zip(ref["seconds_per_seed"], r["seconds_per_seed"])]
        r["speedup_std"] = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
        r["flops_ratio"] = r["gflops_per_image"] / ref["gflops_per_image"]
        r["nfe_equivalent"] = ref["nfe"] * r["flops_ratio"]
    # The honest baseline, read off at a cache's compute and at its wall-clock time.
    curve = [r for r in rows if r["kind"] != "cache"]
    for r in rows:
        # Paired by seed: the same noise and classes went into both FIDs.
        r["dfid_vs_uncached"] = paired(r["fid_per_seed"], ref["fid_per_seed"])
        if r["kind"] == "cache":
            r["fewer_steps_fid_at_same_flops"] = interp(r["gflops_per_image"],
                                                        [(c["gflops_per_image"], c["fid"]) for c in curve])
            at = interp(r["speedup"], [(c["speedup"], c["fid"]) for c in curve])
            r["fewer_steps_fid_at_same_time"] = at
            r["beats_fewer_steps"] = None if at is None else r["fid"] < at
            r["dfid_vs_fewer_steps"] = None if at is None else paired(
                r["fid_per_seed"],
                [interp(r["speedup"], [(c["speedup"], c["fid_per_seed"][i]) for c in curve]) for i in range(len(seeds))])


def table_lines(rows: list[dict], n_seeds: int) -> list[str]:
    """The Markdown table of scored rows: header, separator and one line per row."""
    lines = [
        "| method | steps | NFE | NFE-equiv. (FLOPs) | block GFLOPs / img | speedup | FID | dFID vs uncached | "
        "class acc. % | PSNR dB | SSIM | full / all calls | cache MB | FID of fewer steps: same FLOPs | same time | "
        "dFID vs it | beats it? |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def num(x):
        return "" if x is None else f"{x:.2f}"

    def pm(ms):
        return "" if ms is None else f"{ms[0]:+.2f} ± {ms[1]:.2f}"

    for r in rows:
        beats = {None: "n/a" if r["kind"] == "cache" else "", True: "yes", False: "no"}[r.get("beats_fewer_steps")]
        fid = f"{r['fid']:.2f}" + (f" ± {r['fid_std']:.2f}" if n_seeds > 1 else "")
        lines.append(
            f"| {r['method']} | {r['steps']} | {r['nfe']} | {r['nfe_equivalent']:.1f} | {r['gflops_per_image']:.4f} | "
            f"{r['speedup']:.2f}x" + (f" ± {r['speedup_std']:.2f}" if n_seeds > 1 else "") + f" | {fid} | {'' if r['kind'] == 'reference' else pm(r['dfid_vs_uncached'])} | "
            f"{100 * r['class_accuracy']:.1f} | "
            f"{'inf' if r['psnr'] is not None and r['psnr'] >= 100 else format(r['psnr'], '.1f')} | {r['ssim']:.3f} | "
            f"{r['full_calls']}/{r['model_calls']} | {r['cache_mb']:.2f} | {num(r.get('fewer_steps_fid_at_same_flops'))} | "
            f"{num(r.get('fewer_steps_fid_at_same_time'))} | {pm(r.get('dfid_vs_fewer_steps'))} | "
            f"{beats} |")
    return lines


def write_results(name: str, payload: dict, table: str, out: Path) -> Path:
    """Write ``<out>/<name>.json`` (``payload``) and ``<name>.md`` (``table``), each atomically;
    returns the .md path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    md = out / f"{name}.md"
    atomic_write_text(md, table + "\n")
    return md


def write_report(out: Path, name: str, payload: dict, lines: list[str], rows: list[dict]) -> Path:
    """:func:`write_results` plus the Pareto plot ``<name>.png``; returns the .md path."""
    md = write_results(name, payload, "\n".join(lines), out)
    plot(rows, md.with_suffix(".png"))
    return md
