"""Pin what a few training steps of every training objective produce, bit for bit.

    python benchmarks/pin_training.py --tag before
    python benchmarks/pin_training.py --tag after --compare benchmarks/results/pin_training_before.json

Trains a tiny teacher (``DiT-tiny``) on the embedded digits for a few steps, writes its
coupling pairs, then runs a few steps of every objective configuration (flow matching with
MSE and pseudo-Huber, reflow on the pairs, 2-RF++ with and without its perceptual term,
k-step distillation with each distance, SlimFlow's annealing reflow and joint flips, and
flow-guided distillation with the teacher, also with gradient accumulation) in fp32 on one
thread from a fixed seed. Each case records every step's loss (as the exact float hex),
the draws of one step and the final weights (the sum of all parameters in float64 and the
SHA-256 of their bytes), for the model and its EMA.

Writes ``benchmarks/results/pin_training_<tag>.json``. ``--compare OLD.json`` prints, per
case, ``identical`` or what differs, and exits 1 unless every case is identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
STEPS = 4

TINY = ["model.name=DiT-tiny", "train.batch_size=8", "train.precision=fp32", "train.ckpt_every=100",
        "optim.warmup_steps=2", "train.log_every=1", "train.seed=3"]


def digest(tensors) -> dict:
    """float64 sum and SHA-256 of the bytes of a sequence of tensors (in order)."""
    h, total = hashlib.sha256(), 0.0
    for x in tensors:
        x = x.detach().cpu().contiguous()
        h.update((x.view(torch.uint8) if x.dtype != torch.bool else x.to(torch.uint8)).numpy().tobytes())
        total += float(x.double().sum())
    return {"sha256": h.hexdigest(), "sum": total}


def teacher_and_pairs(root: Path) -> dict:
    """Train the teacher run ``root/teacher`` (2 steps) and write 24 pairs to ``root/pairs``."""
    from flowdit.cli import main

    rc = main(["train", "--no-progress", "--no-outputs", "--device", "cpu", *TINY, "flow.label_dropout=0",
               "train.steps=2", f"out_dir={root}", "name=teacher"])
    if rc != 0:
        sys.exit(f"pin_training: teacher training failed ({rc})")
    rc = main(["reflow", "pairs", "--ckpt", str(root / "teacher"), "--num", "24", "--out", str(root / "pairs"),
               "--steps", "2", "--precision", "fp32", "--no-progress"])
    if rc != 0:
        sys.exit(f"pin_training: writing pairs failed ({rc})")
    from flowdit.distill import load_pairs

    p = load_pairs(root / "pairs")
    return {"pairs": digest([p.sample, p.noise, p.label])}


def cases(root: Path) -> dict[str, list[str]]:
    """Each case's overrides; ``{pairs}`` and ``{teacher}`` are filled in with the paths."""
    pairs, teacher = f"data.pairs={root / 'pairs'}", f"distill.teacher={root / 'teacher'}"
    init = f"train.init_from={root / 'teacher'}"
    return {
        "flow mse": [],
        "flow mse shift 2": ["flow.shift=2.0", "flow.time_sampler=uniform"],
        "flow huber": ["flow.loss=huber"],
        "flow huber c": ["flow.loss=huber", "flow.huber_c=0.1", "flow.label_dropout=0"],
        "reflow mse": [pairs, init, "flow.label_dropout=0"],
        "rfpp perceptual 1": [pairs, init, "flow.loss=rfpp", "flow.time_sampler=u_shaped:a=4"],
        "rfpp perceptual 0": [pairs, "flow.loss=rfpp", "flow.perceptual_weight=0"],
        "distill 1 mse": [pairs, init, "distill.steps=1", "distill.loss=mse"],
        "distill 2 mse": [pairs, "distill.steps=2", "distill.loss=mse"],
        "distill 2 huber": [pairs, "distill.steps=2", "distill.loss=huber"],
        "distill 1 perceptual": [pairs, "distill.steps=1", "distill.loss=perceptual"],
        "distill 2 perceptual": [pairs, init, "distill.steps=2", "distill.loss=perceptual"],
        "slimflow anneal linear": [pairs, "distill.anneal_steps=3", "flow.label_dropout=0"],
        "slimflow anneal cos flip": [pairs, "distill.anneal_steps=6", "distill.anneal_schedule=cos",
                                     "distill.flip=true"],
        "slimflow flip distill 2": [pairs, "distill.flip=true", "distill.steps=2"],
        "slimflow teacher mse": [pairs, init, teacher, "distill.steps=1"],
        "slimflow teacher perceptual flip": [pairs, init, teacher, "distill.steps=1", "distill.loss=perceptual",
                                             "distill.flip=true", "distill.teacher_weight=0.5"],
        "slimflow teacher weight 0": [pairs, teacher, "distill.steps=1", "distill.teacher_weight=0"],
        "slimflow teacher accum 2": [pairs, init, teacher, "distill.steps=1", "train.grad_accum=2",
                                     "distill.anneal_steps=2"],
    }


def run_case(root: Path, name: str, overrides: list[str]) -> dict:
    from flowdit.train.config import RunConfig
    from flowdit.train.trainer import Trainer
    from flowdit.utils.config import load_config

    slug = name.replace(" ", "_")
    cfg = load_config(RunConfig, None, TINY + [f"out_dir={root}", f"name={slug}", f"train.steps={STEPS}",
                                               *overrides])
    tr = Trainer(cfg, device="cpu", progress=False)
    try:
        draws = digest([x for x in tr.draw(1)])
        tr.model.train()
        losses = []
        for _ in range(STEPS):
            out = tr.train_step()
            losses.append(float(out["loss"]).hex())
        obj = tr.objective
        chosen = getattr(obj, "name", "") or type(obj).__name__
        if getattr(obj, "inner", None) is not None:
            chosen += f"({obj.inner.name})"
        return {"overrides": [o.replace(str(root), "<tmp>") for o in overrides], "objective": chosen,
                "losses": losses,
                "draws_step_1": draws, "model": digest(tr.model.parameters()), "ema": digest(tr.ema.parameters())}
    finally:
        tr.close()


def compare(new: dict, old: dict) -> bool:
    ok = True
    for name in sorted(set(old["cases"]) | set(new["cases"])):
        a, b = old["cases"].get(name), new["cases"].get(name)
        if a is None or b is None:
            print(f"{name}: missing in {'the old' if a is None else 'the new'} file")
            ok = False
            continue
        diff = [k for k in ("losses", "draws_step_1", "model", "ema") if a[k] != b[k]]
        print(f"{name}: {'identical' if not diff else 'differs in ' + ', '.join(diff)}")
        ok = ok and not diff
    if old.get("setup") != new.get("setup"):
        print("setup (teacher pairs): differs")
        ok = False
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="after", help="writes benchmarks/results/pin_training_<tag>.json")
    ap.add_argument("--compare", type=Path, help="an earlier pin file; exit 1 unless every case is identical")
    args = ap.parse_args()
    torch.set_num_threads(1)  # bitwise-repeatable reductions
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup = teacher_and_pairs(root)
        results = {name: run_case(root, name, ov) for name, ov in cases(root).items()}
    payload = {"torch": torch.__version__, "steps": STEPS, "setup": setup, "cases": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"pin_training_{args.tag}.json"
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out.relative_to(REPO)} ({len(results)} cases)")
    if args.compare:
        return 0 if compare(payload, json.loads(args.compare.read_text())) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
