"""The outputs of a text-to-image run: prompt grids during training, and at the end
samples for test prompts scored by the scene judge (``metrics.json``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from ..inference.text import TextRun, generate_from_prompts
from ..utils.files import write_json
from ..utils.images import save_captioned_grid, save_npz

__all__ = ["trainer_text_run", "save_prompt_grid", "evaluation_prompts", "judge_prompts", "write_text_run_outputs"]


def trainer_text_run(trainer) -> TextRun:
    """The trainer's EMA model as a :class:`TextRun` (its encoder, its latent space)."""
    space = None
    latents = getattr(trainer.dataset, "meta", None)
    if latents:
        from ..models.autoencoder import LatentSpace

        space = LatentSpace.from_pretrained(latents["source"]["autoencoder"])
    return TextRun(trainer.ema, trainer.conditioning.encoder, space, tuple(trainer.dataset.shape),
                   trainer.cfg.flow.shift, trainer.meta())


def evaluation_prompts(split: str, n: int, seed: int = 0, image_size: int = 64):
    """``n`` prompts (each scene's first caption) and scene graphs of a shapes split."""
    from ..data.shapes import captions, scene_graph

    graphs = [scene_graph(i, split, seed, image_size, image_size) for i in range(n)]
    return [captions(g)[0] for g in graphs], graphs


@torch.no_grad()
def save_prompt_grid(trainer, path: Path, n: int = 16) -> None:
    """EMA samples for the first ``n`` validation prompts, each captioned with its prompt."""
    sc = trainer.cfg.sample
    prompts, _ = evaluation_prompts("val", n)
    imgs, _ = generate_from_prompts(trainer_text_run(trainer), prompts, solver=sc.solver, steps=sc.steps,
                                    cfg_scale=sc.cfg, seed=trainer.cfg.train.seed, amp_dtype=trainer.amp_dtype)
    save_captioned_grid(imgs, prompts, path, nrow=8)


def judge_prompts(run: TextRun, prompts, graphs, **kw) -> tuple[dict, torch.Tensor, float]:
    """Generate for ``prompts`` and score against ``graphs``: ``(summary with per-object-count
    rows, images, seconds per image)``; ``kw`` go to :func:`generate_from_prompts`."""
    from ..eval.shapes_judge import score, summarise

    t0 = time.perf_counter()
    imgs, nfe = generate_from_prompts(run, prompts, **kw)
    sec = (time.perf_counter() - t0) / max(1, len(prompts))
    scores = [score(imgs[i], g) for i, g in enumerate(graphs)]
    out = summarise(scores)
    out["nfe"] = nfe
    for k in (1, 2, 3):
        sub = [s for s, g in zip(scores, graphs) if len(g.objects) == k]
        if sub:
            out[f"objects_{k}"] = summarise(sub)
    return out, imgs, sec


@torch.no_grad()
def write_text_run_outputs(trainer, extra: Optional[dict] = None, progress: bool = True) -> dict:
    """``samples.png`` (captioned), ``samples.npz`` (images and prompts) and
    ``metrics.json``: the judge on ``sample.num_eval`` test prompts and a fifth as many
    held-out ones, with the run's solver, steps and guidance scale."""
    cfg, run_dir = trainer.cfg, trainer.run_dir
    sc = cfg.sample
    run = trainer_text_run(trainer)
    kw = dict(solver=sc.solver, steps=sc.steps, cfg_scale=sc.cfg, amp_dtype=trainer.amp_dtype, progress=progress)
    prompts, graphs = evaluation_prompts("test", sc.num_eval)
    test, imgs, sec = judge_prompts(run, prompts, graphs, seed=cfg.train.seed + 2, **kw)
    save_captioned_grid(imgs[:32], prompts[:32], run_dir / "samples.png", nrow=8)
    save_npz(run_dir / "samples.npz", imgs, None)
    (run_dir / "samples_prompts.txt").write_text("\n".join(prompts) + "\n")
    h_prompts, h_graphs = evaluation_prompts("heldout", max(1, sc.num_eval // 5))
    held, _, _ = judge_prompts(run, h_prompts, h_graphs, seed=cfg.train.seed + 3, **kw)
    metrics = {"dataset": "shapes", "solver": sc.solver, "steps": sc.steps, "cfg": sc.cfg,
               "judge_test": test, "judge_heldout": held, "sample_seconds_per_image": sec}
    metrics.update(extra or {})
    write_json(run_dir / "metrics.json", metrics)
    return metrics
