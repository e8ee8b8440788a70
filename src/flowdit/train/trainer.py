"""The rectified-flow training loop: AdamW, EMA, clipping, bf16 autocast, accumulation,
``torchrun`` data parallelism, atomic checkpoints and exact resume.

Determinism. Every random draw of a step (the noise ``eps``, the time ``t``, the label
dropout) is made for the whole global batch from a generator seeded by ``(seed, step)``,
and each process takes its slice by global sample index. The data order is a permutation
seeded by ``(seed, epoch)``. So the samples a step sees, and what is drawn for each of
them, depend neither on the number of processes nor on whether the run was resumed:
a 2-process run equals a 1-process run with the same global batch up to the order of
floating-point reductions, and a resumed run continues the same loss curve.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from ..core.timesteps import build_time_sampler, shift_time
from ..data import build_dataset
from ..distill.onestep import distill_times
from ..distill.slimflow import anneal_randomness, guide_times, joint_flip, mix_noise
from ..errors import CheckpointError, FlowditError
from ..models import DiT, build_model
from ..utils.config import save_config, to_dict
from ..utils.precision import autocast
from ..utils.seeding import seeded_generator
from . import dist as D
from .checkpoint import latest_checkpoint, load_checkpoint, load_state_dict_strict, save_checkpoint
from .config import RunConfig
from .objective import Objective


class TrainingDiverged(FlowditError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for a precision setting (``None``: plain fp32).

    ``auto`` picks bf16 where the hardware runs it fast (CUDA with bf16, or a CPU with
    AVX512-BF16/AMX), fp32 elsewhere. Master weights stay fp32 in every case.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


_DATA_STREAM, _NOISE_STREAM, _GUIDE_STREAM = 1, 2, 3


def global_batch_indices(step: int, batch_size: int, num_items: int, seed: int) -> torch.Tensor:
    """Data indices of the global batch of ``step``: positions ``[step * G, (step + 1) * G)``
    of an endless sequence of per-epoch permutations seeded by ``(seed, epoch)``."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = pos // num_items
    out = torch.empty_like(pos)
    for e in epochs.unique().tolist():
        perm = torch.randperm(num_items, generator=seeded_generator(seed, _DATA_STREAM, e))
        sel = epochs == e
        out[sel] = perm[pos[sel] % num_items]
    return out


def compiled_or_eager(module: torch.nn.Module):
    """``torch.compile(module)``, falling back to the eager module (with one message) if
    compiling fails, at construction or at the first call where the graph is built:
    compilation is an optimisation, never a requirement."""
    try:
        compiled = torch.compile(module)
    except Exception as exc:
        print(f"flowdit: torch.compile unavailable ({type(exc).__name__}: {exc}); running eager")
        return module
    state = {"fn": compiled, "ok": False}

    def call(*args, **kwargs):
        if state["ok"]:
            return state["fn"](*args, **kwargs)
        try:
            out = state["fn"](*args, **kwargs)
        except Exception as exc:
            print(f"flowdit: torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); running eager")
            state["fn"] = module
            out = module(*args, **kwargs)
        state["ok"] = True
        return out

    return call


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` over all parameters, in one fused op."""
    e = [p for p in ema.parameters()]
    m = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e, m, 1.0 - decay)


class Trainer:
    """Trains a class-conditional DiT with the rectified-flow objective.

    ``Trainer(cfg).fit()`` writes ``<out_dir>/<name>/``: ``config.yaml``,
    ``metrics.jsonl``, ``checkpoints/step_*/`` and, when asked, sample grids.
    """

    def __init__(self, cfg: RunConfig, resume: bool = False, device: Optional[str] = None, progress: bool = True):
        self.cfg = cfg
        self.dist = D.init_distributed(device)
        self.device = self.dist.device
        self.progress = progress and self.dist.is_main
        self.run_dir = Path(cfg.out_dir) / cfg.name
        tc = cfg.train
        world = self.dist.world_size
        if tc.batch_size % (world * tc.grad_accum):
            raise FlowditError(
                f"train.batch_size {tc.batch_size} must be divisible by processes x grad_accum = {world} x {tc.grad_accum}"
            )
        self.micro_batch = tc.batch_size // (world * tc.grad_accum)

        self.dataset = build_dataset(cfg.data.dataset, root=cfg.data.root, split="train",
                                     image_size=cfg.data.image_size, channels=cfg.data.channels)
        C, H, W = self.dataset.shape
        self.pairs = self._load_pairs(cfg.data.pairs) if cfg.data.pairs else None
        torch.manual_seed(tc.seed)  # identical initial weights on every process
        self.model: DiT = build_model(cfg.model.name, H, C, self.dataset.num_classes, **cfg.model.overrides()).to(self.device)
        if tc.init_from and not resume:
            self._init_from(tc.init_from)
        self.model.grad_checkpointing = tc.grad_checkpoint
        if self.device.type == "cuda" and tc.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.ema: DiT = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.time_sampler = build_time_sampler(cfg.flow.time_sampler)
        self.amp_dtype = autocast_dtype(tc.precision, self.device)
        self.objective = Objective(cfg, self.dataset, self.device, self.amp_dtype)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
        )
        self.step = 0
        if resume:
            self._resume()
        self.ddp = DDP(self.model) if self.dist.enabled else None
        fwd = self.ddp if self.ddp is not None else self.model
        self.forward = compiled_or_eager(fwd) if tc.compile else fwd

    # -- state ------------------------------------------------------------------------

    def meta(self) -> dict:
        return {
            "config": to_dict(self.cfg),
            "model_config": self.model.config_dict(),
            "data": {"name": self.dataset.name, "shape": list(self.dataset.shape),
                     "num_classes": self.dataset.num_classes, "class_names": list(self.dataset.class_names)},
        }

    def save(self) -> Path:
        """Write a checkpoint of the current step (main process only)."""
        if not self.dist.is_main:
            return self.run_dir
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        return save_checkpoint(
            self.run_dir, self.step,
            {"model": self.model.state_dict(), "ema": self.ema.state_dict()},
            state, self.meta(), keep_last=self.cfg.train.keep_ckpts,
        )

    def _load_pairs(self, path: str):
        from ..distill.pairs import load_pairs

        pairs = load_pairs(path)
        if tuple(pairs.noise.shape[1:]) != tuple(self.dataset.shape):
            raise FlowditError(f"data.pairs {path}: pairs of shape {tuple(pairs.noise.shape[1:])} do not match "
                               f"the data set's {tuple(self.dataset.shape)}")
        if pairs.label is None or int(pairs.label.max()) >= self.dataset.num_classes:
            raise FlowditError(f"data.pairs {path}: labels missing or outside 0..{self.dataset.num_classes - 1}")
        return pairs

    def _init_from(self, path: str) -> None:
        """Start from another run's EMA weights (same architecture), e.g. reflow from its teacher."""
        ckpt = load_checkpoint(path, map_location="cpu", load_tensors_only=True)
        saved = ckpt.meta.get("model_config")
        if saved is not None and saved != self.model.config_dict():
            raise CheckpointError(f"train.init_from {path}: model config {saved} differs from the configured one")
        load_state_dict_strict(self.model, ckpt.tensors["ema"], "ema")

    def _resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            if self.dist.is_main:
                print(f"flowdit: no checkpoint in {self.run_dir}; starting from step 0")
            return
        ckpt = load_checkpoint(path, map_location="cpu")
        saved_model = ckpt.meta.get("model_config")
        if saved_model is not None and saved_model != self.model.config_dict():
            raise CheckpointError(f"{path}: saved model config {saved_model} differs from the configured one")
        load_state_dict_strict(self.model, ckpt.tensors["model"], "model")
        load_state_dict_strict(self.ema, ckpt.tensors["ema"], "ema")
        self.optimizer.load_state_dict(ckpt.trainer_state["optimizer"])
        torch.set_rng_state(ckpt.trainer_state["torch_rng"])
        self.step = int(ckpt.trainer_state["step"])
        if self.dist.is_main:
            print(f"flowdit: resumed from {path} at step {self.step}")

    # -- one step -----------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        warm = self.cfg.optim.warmup_steps
        return self.cfg.optim.lr * min(1.0, (step + 1) / warm) if warm > 0 else self.cfg.optim.lr

    def ema_decay_at(self, step: int) -> float:
        d = self.cfg.optim.ema_decay
        return min(d, (1 + step) / (10 + step)) if self.cfg.optim.ema_warmup else d

    def draw(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images, labels, noise, times and the dropout mask of this process's share of
        the global batch of ``step`` (see the module docstring)."""
        tc, G = self.cfg.train, self.cfg.train.batch_size
        idx = global_batch_indices(step, G, len(self.pairs if self.pairs is not None else self.dataset), tc.seed)
        g = seeded_generator(tc.seed, _NOISE_STREAM, step)
        C, H, W = self.dataset.shape
        eps = torch.randn(G, C, H, W, generator=g)
        t = self.time_sampler.sample(G, generator=g)
        drop = torch.rand(G, generator=g) < self.cfg.flow.label_dropout
        if self.cfg.flow.shift != 1.0:
            t = shift_time(t, self.cfg.flow.shift)
        # Distillation draws come after the ones above, so plain runs keep their streams.
        d = self.cfg.distill
        if d.steps:  # k-step distillation: t only on the student's Euler grid
            t = distill_times(d.steps, torch.rand(G, generator=g))
        flip = torch.rand(G, generator=g) < 0.5 if d.flip else None
        share = G // self.dist.world_size
        lo = self.dist.rank * share
        sl = slice(lo, lo + share)
        if self.pairs is not None:  # reflow: the coupling's own noise replaces the fresh draw
            x0, y, z = self.pairs.sample[idx[sl]], self.pairs.label[idx[sl]], self.pairs.noise[idx[sl]]
            if d.anneal_steps:  # SlimFlow's annealing reflow: blend in this step's fresh noise
                z = mix_noise(z, eps[sl], anneal_randomness(step, d.anneal_steps, d.anneal_schedule))
            if flip is not None:
                x0, z = joint_flip(x0, z, flip[sl])
        else:
            (x0, y), z = self.dataset.batch(idx[sl]), eps[sl]
        y = torch.where(drop[sl], torch.full_like(y, self.model.null_class), y)
        dev = self.device
        return x0.to(dev), y.to(dev), z.to(dev), t[sl].to(dev), idx[sl]

    def draw_guide(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh noise and intermediate times ``s`` of the flow-guided term (``distill.teacher``)
        for this process's share of step ``step``, from their own seeded stream."""
        G = self.cfg.train.batch_size
        C, H, W = self.dataset.shape
        g = seeded_generator(self.cfg.train.seed, _GUIDE_STREAM, step)
        z, s = torch.randn(G, C, H, W, generator=g), guide_times(torch.rand(G, generator=g))
        share = G // self.dist.world_size
        sl = slice(self.dist.rank * share, (self.dist.rank + 1) * share)
        return z[sl].to(self.device), s[sl].to(self.device)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The trained model's velocity under the run's autocast, as float32."""
        with autocast(self.device.type, self.amp_dtype):
            return self.forward(x, t, y).float()

    def train_step(self) -> dict:
        tc = self.cfg.train
        model, opt = self.model, self.optimizer
        x0, y, eps, t, _ = self.draw(self.step)
        fresh, s = self.draw_guide(self.step) if self.objective.teacher is not None else (None, None)
        lr = self.lr_at(self.step)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        mb = self.micro_batch
        for m in range(tc.grad_accum):
            sl = slice(m * mb, (m + 1) * mb)
            last = m == tc.grad_accum - 1
            sync = nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()
            with sync:
                guide = (fresh[sl], s[sl]) if fresh is not None else ()
                loss = self.objective(self.velocity, x0[sl], eps[sl], t[sl], y[sl], *guide)
                (loss / tc.grad_accum).backward()
            loss_sum += loss.detach() / tc.grad_accum
        loss_mean = D.all_reduce_mean(loss_sum, self.dist)
        if not torch.isfinite(loss_mean):
            opt.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"loss is {loss_mean.item()} at step {self.step}; stopped. The last good checkpoint in "
                f"{self.run_dir / 'checkpoints'} is kept (lower optim.lr or use train.precision=fp32)."
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(self.ema, model, self.ema_decay_at(self.step))
        self.step += 1
        return {"loss": loss_mean, "grad_norm": grad_norm.detach(), "lr": lr}

    # -- the loop ---------------------------------------------------------------------

    def fit(self) -> dict:
        """Train until ``train.steps``; returns the last logged metrics."""
        tc = self.cfg.train
        run_dir = self.run_dir
        if self.dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, run_dir / "config.yaml")
        writer = self._tensorboard()
        log_path = run_dir / "metrics.jsonl"
        bar = tqdm(total=tc.steps, initial=self.step, disable=not self.progress, desc="train", dynamic_ncols=True)
        window_loss, window_n, t0, last = 0.0, 0, time.perf_counter(), {}
        self.model.train()
        try:
            while self.step < tc.steps:
                out = self.train_step()
                window_loss += float(out["loss"])
                window_n += 1
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    dt = time.perf_counter() - t0
                    last = {
                        "step": self.step, "loss": window_loss / window_n, "grad_norm": float(out["grad_norm"]),
                        "lr": out["lr"], "images_per_s": window_n * tc.batch_size / dt, "time": time.time(),
                    }
                    if self.dist.is_main:
                        with open(log_path, "a") as f:
                            f.write(json.dumps(last) + "\n")
                        if writer is not None:
                            for k in ("loss", "grad_norm", "lr", "images_per_s"):
                                writer.add_scalar(f"train/{k}", last[k], self.step)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", ips=f"{last['images_per_s']:.0f}")
                    window_loss, window_n, t0 = 0.0, 0, time.perf_counter()
                if tc.ckpt_every and self.step % tc.ckpt_every == 0 and self.step < tc.steps:
                    self.save()
                    D.barrier(self.dist)
                if tc.sample_every and self.step % tc.sample_every == 0 and self.dist.is_main:
                    self.sample_grid(run_dir / "samples" / f"step_{self.step:07d}.png")
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        self.save()
        D.barrier(self.dist)
        return last

    def _tensorboard(self):
        if not (self.cfg.train.tensorboard and self.dist.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("flowdit: train.tensorboard=true but tensorboard is not installed (pip install tensorboard); skipping")
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    @torch.no_grad()
    def sample_grid(self, path: Path, per_class: int = 8) -> None:
        """A grid of EMA samples, one row per class, from a fixed noise seed."""
        from .outputs import sample_classes
        from ..utils.images import save_grid_png

        imgs, _ = sample_classes(self.ema, self.dataset.shape, self.dataset.num_classes, per_class,
                                 self.cfg.sample, seed=self.cfg.train.seed, amp_dtype=self.amp_dtype,
                                 device=self.device, shift=self.cfg.flow.shift)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid_png(imgs, path, nrow=per_class)
