"""The rectified-flow training loop: AdamW, EMA, clipping, bf16 autocast, accumulation,
``torchrun`` data parallelism, atomic checkpoints and exact resume.

Determinism. Every random draw of a step (the noise ``eps``, the time ``t``, the label
dropout, then the training objective's own) is made for the whole global batch from a
generator seeded by ``(seed, step)`` (an objective may use further streams seeded by
``(seed, k, step)``), and each process takes its slice by global sample index. The data
order is a permutation seeded by ``(seed, epoch)``. So the samples a step sees, and what
is drawn for each of them, depend neither on the number of processes nor on whether the
run was resumed: a 2-process run equals a 1-process run with the same global batch up to
the order of floating-point reductions, and a resumed run continues the same loss curve.

Never losing a run. The main process holds an exclusive lock on the run directory
(:class:`flowdit.utils.files.DirLock`) from construction to the end of :meth:`Trainer.fit`.
A step whose loss or gradient norm is not finite is caught before the optimizer step
(nothing is updated, nothing saved): the run stops, or skips it while fewer than
``train.max_nonfinite_steps`` have been skipped. A checkpoint is written only with
finite weights. A resume takes its settings from the checkpoint it continues; a change
that alters the trajectory is refused unless asked for, and then recorded next to the run
(``config.resume-N.yaml``).
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
from ..errors import CheckpointError, ConfigError, FlowditError
from ..models import DiT, build_model
from ..utils.config import config_diff, from_dict, save_config, to_dict
from ..utils.files import DirLock, check_writable, finite_or_none  # noqa: F401  (re-exported)
from ..utils.precision import autocast, autocast_dtype, cpu_has_bf16  # noqa: F401  (cpu_has_bf16 re-exported)
from ..utils.seeding import seeded_generator
from . import dist as D
from .checkpoint import (
    checkpoint_candidates,
    load_checkpoint,
    load_state_dict_strict,
    move_aside,
    nonfinite_tensors,
    save_checkpoint,
    verify_checkpoint,
)
from .conditioning import build_conditioning
from .config import RESUME_FREE_KEYS, RunConfig
from .objectives import StepDraws, build_objective

# What a trainer state must hold to continue a run exactly.
_STATE_KEYS = ("step", "optimizer", "torch_rng")


class TrainingDiverged(FlowditError):
    """The loss, the gradient norm or the weights became NaN or infinite; nothing after
    the last finite checkpoint was saved."""


def saved_run_config(run_dir: Path) -> Optional[dict]:
    """The config a resume of ``run_dir`` starts from, as a plain dict: the one recorded in
    the manifest of its newest intact checkpoint, else its ``config.yaml``; None for a
    directory without either."""
    for path in checkpoint_candidates(run_dir):
        try:  # the checkpoint a resume would continue is the newest intact one
            meta = verify_checkpoint(path).get("meta", {})
        except CheckpointError:
            continue
        if isinstance(meta.get("config"), dict):
            return meta["config"]
    cfg_file = run_dir / "config.yaml"
    if cfg_file.is_file():
        import yaml

        try:
            data = yaml.safe_load(cfg_file.read_text())
        except yaml.YAMLError:
            raise ConfigError(f"{cfg_file}: not valid YAML; pass --config to resume with a recipe") from None
        return data if isinstance(data, dict) else None
    return None


def existing_run(run_dir: Path) -> Optional[str]:
    """What makes ``run_dir`` an existing run (its checkpoints, config or log), or None."""
    steps = checkpoint_candidates(run_dir)
    if steps:
        return f"checkpoints up to {steps[0].name}"
    for name in ("config.yaml", "metrics.jsonl"):
        if (run_dir / name).exists():
            return name
    return None


# The trainer's seeded streams; an objective's own start at objectives.FIRST_OBJECTIVE_STREAM.
_DATA_STREAM, _NOISE_STREAM = 1, 2


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
    """Trains a class-conditional DiT with the training objective the config selects
    (:func:`flowdit.train.objectives.build_objective`; the rules in docs/training.md).

    ``Trainer(cfg).fit()`` writes ``<out_dir>/<name>/``: ``config.yaml``,
    ``metrics.jsonl``, ``checkpoints/step_*/`` and, when asked, sample grids.
    """

    def __init__(self, cfg: RunConfig, resume: bool = False, device: Optional[str] = None, progress: bool = True,
                 allow_config_change: bool = False, resume_fallback: bool = False):
        self.cfg = cfg.resolved()
        self.allow_config_change = allow_config_change
        self.resume_fallback = resume_fallback
        self.dist = D.init_distributed(device)
        self.device = self.dist.device
        self.progress = progress and self.dist.is_main
        self.run_dir = Path(self.cfg.out_dir) / self.cfg.name
        self.last_checkpoint: Optional[Path] = None  # the newest finite checkpoint of this run
        self.resumed_from: Optional[int] = None
        self.config_changes: list[tuple[str, object, object]] = []
        self._protect_after: Optional[int] = None
        self.nonfinite_steps = 0
        self._lock: Optional[DirLock] = None
        if self.dist.is_main:
            check_writable(self.run_dir, "out_dir")
            self._lock = DirLock(self.run_dir).acquire()
        try:
            self._build(resume)
        except BaseException:
            self.close()
            raise

    def _build(self, resume: bool) -> None:
        cfg, tc = self.cfg, self.cfg.train
        if not resume and self.dist.is_main:
            found = existing_run(self.run_dir)
            if found:
                raise ConfigError(f"{self.run_dir} already holds a run ({found}): pass --resume to continue it, "
                                  "or choose another name= (or out_dir=)")
        world = self.dist.world_size
        if tc.batch_size % (world * tc.grad_accum):
            raise ConfigError(
                f"train.batch_size {tc.batch_size} must be divisible by processes x train.grad_accum = "
                f"{world} x {tc.grad_accum}"
            )
        self.micro_batch = tc.batch_size // (world * tc.grad_accum)

        self.dataset = self._load_data()
        C, H, W = self.dataset.shape
        self.pairs = self._load_pairs(cfg.data.pairs) if cfg.data.pairs else None
        torch.manual_seed(tc.seed)  # identical initial weights on every process
        self.model: DiT = build_model(cfg.model.name, H, C, self.dataset.num_classes, **cfg.model.overrides()).to(self.device)
        self.conditioning = build_conditioning(cfg, self.dataset, self.model, progress=self.progress)
        if tc.init_from and not resume:
            self._init_from(tc.init_from)
        self.model.grad_checkpointing = tc.grad_checkpoint
        if self.device.type == "cuda" and tc.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.ema: DiT = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.time_sampler = build_time_sampler(cfg.flow.time_sampler)
        self.amp_dtype = autocast_dtype(tc.precision, self.device)
        self.objective = build_objective(cfg, self.dataset, self.device, self.amp_dtype)
        self.objective.bind(self.model, self.ema)
        # Training-only modules of the objective (a projection head): optimized with the
        # model, saved as the checkpoint's "heads", never part of the sampled model.
        self.heads: Optional[torch.nn.Module] = self.objective.trainable()
        if self.heads is not None:
            self.heads.to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.param_groups(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
        )
        self.step = 0
        if resume:
            self._resume()
        self.ddp = DDP(self.model) if self.dist.enabled else None
        fwd = self.ddp if self.ddp is not None else self.model
        self.forward = compiled_or_eager(fwd) if tc.compile else fwd

    def parameters(self) -> list[torch.nn.Parameter]:
        """Everything the optimizer updates: the model's parameters, then those of the
        objective's training-only modules (:meth:`TrainingObjective.trainable`)."""
        params = list(self.model.parameters())
        if self.heads is not None:
            params += list(self.heads.parameters())
        return params

    def param_groups(self) -> list:
        """What the AdamW is built from: :meth:`parameters` (one learning rate), or for a muP
        model (``model.mup_base_width``) the groups of :func:`flowdit.models.mup.mup_param_groups`
        (hidden matrices at ``lr x base / width``) plus the objective's heads at the base rate.
        Each group's ``lr_scale`` multiplies the scheduled learning rate (:meth:`train_step`)."""
        if getattr(self.model.config, "mup_base_width", None) is None:
            return self.parameters()
        from ..models.mup import mup_param_groups

        groups = mup_param_groups(self.model, self.cfg.optim.lr, self.cfg.optim.weight_decay)
        if self.heads is not None:
            groups.append({"params": list(self.heads.parameters()), "lr_scale": 1.0, "mup": "heads"})
        return groups

    def _load_data(self):
        """The training data: a latent cache (``data.latents``) or the named image data set."""
        cfg = self.cfg
        if cfg.data.latents:
            from ..data.latent_cache import load_latent_cache

            return load_latent_cache(cfg.data.latents)
        if cfg.data.dataset == "shapes" and cfg.data.num_items:
            from ..data.shapes import load_shapes

            return load_shapes("train", cfg.data.image_size, n=cfg.data.num_items)
        return build_dataset(cfg.data.dataset, root=cfg.data.root, split="train",
                             image_size=cfg.data.image_size, channels=cfg.data.channels)

    def close(self) -> None:
        """Release this trainer's hold on the run directory's lock (idempotent)."""
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
            self._lock = None

    def __del__(self):
        self.close()

    # -- state ------------------------------------------------------------------------

    def meta(self) -> dict:
        out = {
            "config": to_dict(self.cfg),
            "model_config": self.model.config_dict(),
            "model_class": type(self.model).__name__,
            "data": {"name": self.dataset.name, "shape": list(self.dataset.shape),
                     "num_classes": self.dataset.num_classes, "class_names": list(self.dataset.class_names)},
        }
        if getattr(self.dataset, "meta", None):  # a latent cache: the autoencoder that decodes samples
            out["latents"] = self.dataset.meta
        if self.conditioning.kind == "text":
            out["text"] = {"encoder": self.cfg.text.encoder, "identity": self.conditioning.encoder.identity,
                           "max_length": self.cfg.text.max_length}
        return out

    def save(self) -> Path:
        """Write a checkpoint of the current step (main process only). Weights holding a
        NaN or an infinity are never written: that raises :class:`TrainingDiverged`."""
        if not self.dist.is_main:
            return self.run_dir
        tensors = {"model": self.model.state_dict(), "ema": self.ema.state_dict()}
        if self.heads is not None:
            tensors["heads"] = self.heads.state_dict()
        bad = nonfinite_tensors(tensors)
        if bad:
            raise TrainingDiverged(f"training diverged by step {self.step}: {len(bad)} weight tensors hold NaN or "
                                   f"inf (first {bad[0]}); not saved. {self._last_good()}")
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "nonfinite_steps": self.nonfinite_steps,
        }
        path = save_checkpoint(
            self.run_dir, self.step, tensors, state, self.meta(), keep_last=self.cfg.train.keep_ckpts,
            protect_after=self._protect_after,
        )
        self.last_checkpoint = path
        return path

    def _last_good(self) -> str:
        if self.last_checkpoint is None:
            return "No checkpoint of this run was written yet."
        return (f"The last finite checkpoint is {self.last_checkpoint} (continue from it with --resume, "
                "e.g. with a lower optim.lr).")

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

    def _choose_checkpoint(self):
        """``(checkpoint, damaged)``: the newest checkpoint that loads and verifies, and the
        newer ones that do not, as ``(path, error)``. Damaged newer ones stop the resume,
        naming the one that would be used, unless ``resume_fallback``."""
        damaged = []
        for path in checkpoint_candidates(self.run_dir):
            try:
                ckpt = load_checkpoint(path, map_location="cpu")
            except CheckpointError as e:
                damaged.append((path, e))
                continue
            if damaged and not self.resume_fallback:
                first, err = damaged[0]
                raise CheckpointError(f"{err} -- the newest intact checkpoint is {path.name}: pass --resume-fallback "
                                      f"to resume from it (the damaged one is kept as corrupt-{first.name})")
            return ckpt, damaged
        if damaged:
            raise damaged[0][1]
        return None, []

    def _resume(self) -> None:
        ckpt, damaged = self._choose_checkpoint()
        if ckpt is None:
            if self.dist.is_main:
                print(f"flowdit: no checkpoint in {self.run_dir}; starting from step 0")
            return
        path = ckpt.path
        state = ckpt.trainer_state
        missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise CheckpointError(f"{path / 'trainer_state.pt'}: trainer state has no {missing[0]!r}; it cannot "
                                  "continue a run")
        self._check_resume_config(ckpt)
        saved_model = ckpt.meta.get("model_config")
        if saved_model is not None and saved_model != self.model.config_dict():
            raise CheckpointError(f"{path}: saved model config {saved_model} differs from the configured one")
        load_state_dict_strict(self.model, ckpt.tensors["model"], "model")
        load_state_dict_strict(self.ema, ckpt.tensors["ema"], "ema")
        if self.heads is not None:
            if "heads" not in ckpt.tensors:
                raise CheckpointError(f"{path}: no heads.safetensors, but flow.objective={self.objective.name} "
                                      "trains heads of its own; this checkpoint was not written by such a run")
            load_state_dict_strict(self.heads, ckpt.tensors["heads"], "heads")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{path / 'trainer_state.pt'}: optimizer or RNG state does not fit this run "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        # Only now that the resume is certain are damaged newer checkpoints renamed: kept for
        # inspection, never loaded or pruned. Every process has chosen before rank 0 renames.
        D.barrier(self.dist)
        if self.dist.is_main:
            for bad, _ in damaged:
                print(f"flowdit: {bad.name} is damaged; kept as {move_aside(bad).name}")
        self.step = int(state["step"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.resumed_from = self.step
        self.last_checkpoint = path
        if self.dist.is_main:
            print(f"flowdit: resumed from {path} at step {self.step}")

    def _check_resume_config(self, ckpt) -> None:
        """The run's saved config is the source of truth: refuse a change of any key
        outside :data:`RESUME_FREE_KEYS` unless ``allow_config_change``; keep the list of
        changes for :meth:`_record_config_changes`."""
        saved = ckpt.meta.get("config")
        if saved is None and (self.run_dir / "config.yaml").is_file():
            import yaml

            saved = yaml.safe_load((self.run_dir / "config.yaml").read_text())
        if saved is None:
            return
        try:  # resolve it as it is now read, so that a run saved before paths were resolved compares equal
            saved = to_dict(from_dict(RunConfig, saved).resolved())
        except ConfigError as e:
            raise CheckpointError(f"{ckpt.path}: saved config is not valid for this flowdit ({e})") from None
        # name and out_dir only say where the run is (found there, however they are spelled).
        changes = [c for c in config_diff(saved, to_dict(self.cfg)) if c[0] not in ("name", "out_dir")]
        refused = [c for c in changes if c[0] not in RESUME_FREE_KEYS]
        if refused and not self.allow_config_change:
            key, old, new = refused[0]
            more = f" (and {len(refused) - 1} more: {', '.join(c[0] for c in refused[1:])})" if len(refused) > 1 else ""
            raise ConfigError(
                f"--resume: {key} is {old!r} in the run ({ckpt.path.name}) but {new!r} here{more}; a resumed run keeps "
                "its settings: drop the change, or pass --allow-config-change to make it (recorded in the run)"
            )
        step = int(ckpt.trainer_state["step"])
        if self.cfg.train.steps < step:
            raise ConfigError(f"train.steps {self.cfg.train.steps} is below the step the run resumes from ({step})")
        self.config_changes = changes
        # Pruning never removes a checkpoint newer than the one resumed from.
        newer = [int(p.name.split("_")[1]) for p in checkpoint_candidates(self.run_dir)]
        self._protect_after = step if any(s > step for s in newer) else None

    def _record_config_changes(self) -> None:
        """Write the config of a resume that changed keys as ``config.resume-N.yaml``, its
        first lines saying what changed; ``config.yaml`` keeps the config the run began with."""
        if not self.config_changes:
            return
        n = 1
        while (self.run_dir / f"config.resume-{n}.yaml").exists():
            n += 1
        lines = [f"resumed at step {self.resumed_from} with changes:"]
        lines += [f"  {k}: {old!r} -> {new!r}" for k, old, new in self.config_changes]
        path = save_config(self.cfg, self.run_dir / f"config.resume-{n}.yaml", header="\n".join(lines))
        shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in self.config_changes)
        print(f"flowdit: resumed with changed settings ({shown}); recorded in {path}")

    # -- one step -----------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        warm = self.cfg.optim.warmup_steps
        return self.cfg.optim.lr * min(1.0, (step + 1) / warm) if warm > 0 else self.cfg.optim.lr

    def ema_decay_at(self, step: int) -> float:
        d = self.cfg.optim.ema_decay
        return min(d, (1 + step) / (10 + step)) if self.cfg.optim.ema_warmup else d

    def draw_step(self, step: int) -> dict:
        """This process's share of the global batch of ``step`` (see the module docstring):
        ``x0, y, eps, t, idx`` (data or pair ends, labels with the dropped ones set to the
        null class, times, data indices) and ``extras``, the objective's own draws.

        Order of the draws from the step's noise stream: the noise, the times (then
        ``flow.shift``), the label dropout, then the objective's
        (:meth:`flowdit.train.objectives.TrainingObjective.draw`); so an objective that draws
        nothing leaves the others' streams as they are."""
        tc, G = self.cfg.train, self.cfg.train.batch_size
        idx = global_batch_indices(step, G, len(self.pairs if self.pairs is not None else self.dataset), tc.seed)
        g = seeded_generator(tc.seed, _NOISE_STREAM, step)
        C, H, W = self.dataset.shape
        eps = torch.randn(G, C, H, W, generator=g)
        t = self.time_sampler.sample(G, generator=g)
        drop = torch.rand(G, generator=g) < self.cfg.flow.label_dropout
        if self.cfg.flow.shift != 1.0:
            t = shift_time(t, self.cfg.flow.shift)
        draws = StepDraws(step=step, eps=eps, t=t, seed=tc.seed, idx=idx)
        extras = self.objective.draw(draws, g)
        t = draws.t
        cond_draws = self.conditioning.draw(step, tc.seed, G)
        share = G // self.dist.world_size
        lo = self.dist.rank * share
        sl = slice(lo, lo + share)
        extras = {k: v[sl] for k, v in extras.items()}
        if self.pairs is not None:  # reflow: the coupling's own noise replaces the fresh draw
            x0, y, z = self.pairs.sample[idx[sl]], self.pairs.label[idx[sl]], self.pairs.noise[idx[sl]]
        else:
            (x0, y), z = self.dataset.batch(idx[sl]), eps[sl]
        x0, z = self.objective.couple(step, x0, z, eps[sl], extras)
        y = self.conditioning.condition(idx[sl], y, drop[sl], None if cond_draws is None else cond_draws[sl])
        dev = self.device
        return {"x0": x0.to(dev), "y": y.to(dev), "eps": z.to(dev), "t": t[sl].to(dev), "idx": idx[sl],
                "extras": {k: v.to(dev) for k, v in extras.items()}}

    def draw(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images, labels, noise, times and data indices of this process's share of the
        global batch of ``step`` (:meth:`draw_step` without the objective's extras)."""
        b = self.draw_step(step)
        return b["x0"], b["y"], b["eps"], b["t"], b["idx"]

    def velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, ctx=None) -> torch.Tensor:
        """The trained model's velocity under the run's autocast, as float32; ``ctx`` (a
        :class:`flowdit.core.hooks.StepContext`) lets an objective's hooks act inside it."""
        with autocast(self.device.type, self.amp_dtype):
            if ctx is None:
                return self.forward(x, t, y).float()
            return self.forward(x, t, y, ctx=ctx).float()

    def train_step(self) -> dict:
        tc = self.cfg.train
        model, opt = self.model, self.optimizer
        batch = self.draw_step(self.step)
        x0, y, eps, t, extras = batch["x0"], batch["y"], batch["eps"], batch["t"], batch["extras"]
        lr = self.lr_at(self.step)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum = torch.zeros((), device=self.device)
        mb = self.micro_batch
        for m in range(tc.grad_accum):
            sl = slice(m * mb, (m + 1) * mb)
            last = m == tc.grad_accum - 1
            sync = nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()
            with sync:
                loss = self.objective(self.velocity, x0[sl], eps[sl], t[sl], y[sl],
                                      {k: v[sl] for k, v in extras.items()})
                (loss / tc.grad_accum).backward()
            loss_sum += loss.detach() / tc.grad_accum
        loss_mean = D.all_reduce_mean(loss_sum, self.dist)
        if self.heads is not None and self.dist.enabled:
            # DDP averages the model's gradients; the objective's heads are not inside it.
            for p in self.heads.parameters():
                if p.grad is not None:
                    p.grad.copy_(D.all_reduce_mean(p.grad, self.dist))
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters(), clip)
        # Checked before the update: a non-finite loss or gradient must not reach the weights,
        # the EMA or the optimizer's moments. The gradients are all-reduced, so every process
        # sees the same norm and takes the same branch.
        if not bool(torch.isfinite(loss_mean) & torch.isfinite(grad_norm)):  # one device sync per step
            opt.zero_grad(set_to_none=True)
            self.nonfinite_steps += 1
            what = f"loss {loss_mean.item():.4g}, gradient norm {grad_norm.item():.4g}"
            limit = self.cfg.train.max_nonfinite_steps
            if self.nonfinite_steps > limit:
                skipped = f" ({limit} skipped before, train.max_nonfinite_steps={limit})" if limit else ""
                raise TrainingDiverged(
                    f"training diverged at step {self.step + 1}: {what}{skipped}; stopped before the update, "
                    f"nothing saved after it. {self._last_good()}"
                )
            if self.dist.is_main:
                print(f"flowdit: step {self.step + 1} skipped ({what}); {self.nonfinite_steps} of at most {limit}")
            self.step += 1
            return {"loss": loss_mean, "grad_norm": grad_norm.detach(), "lr": lr, "skipped": True}
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(self.ema, model, self.ema_decay_at(self.step))
        self.step += 1
        return {"loss": loss_mean, "grad_norm": grad_norm.detach(), "lr": lr}

    # -- the loop ---------------------------------------------------------------------

    def fit(self) -> dict:
        """Train until ``train.steps``; returns the last logged metrics. Releases this
        trainer's hold on the run directory's lock when it returns or raises."""
        try:
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> dict:
        tc = self.cfg.train
        run_dir = self.run_dir
        if self.dist.is_main:
            if self._lock is None:  # a second fit() of the same trainer takes the lock again
                self._lock = DirLock(run_dir).acquire()
            run_dir.mkdir(parents=True, exist_ok=True)
            if self.resumed_from is None:
                save_config(self.cfg, run_dir / "config.yaml")
            else:
                self._record_config_changes()
                self.config_changes = []
        writer = self._tensorboard()
        log_path = run_dir / "metrics.jsonl"
        bar = tqdm(total=tc.steps, initial=self.step, disable=not self.progress, desc="train", dynamic_ncols=True)
        window_loss, window_n, t0, last = 0.0, 0, time.perf_counter(), {}
        self.model.train()
        try:
            while self.step < tc.steps:
                out = self.train_step()
                if not out.get("skipped"):
                    window_loss += float(out["loss"])
                    window_n += 1
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    dt = time.perf_counter() - t0
                    last = {
                        "step": self.step, "loss": window_loss / window_n if window_n else None,
                        "grad_norm": float(out["grad_norm"]), "lr": out["lr"],
                        "images_per_s": window_n * tc.batch_size / dt, "time": time.time(),
                    }
                    if self.nonfinite_steps:
                        last["nonfinite_steps"] = self.nonfinite_steps
                    # The separate terms of a composite loss (the last step's), e.g. REPA's.
                    for k, v in getattr(self.objective, "terms", {}).items():
                        last[f"loss_{k}"] = float(v)
                    last = finite_or_none(last)
                    if self.dist.is_main:
                        with open(log_path, "a") as f:
                            f.write(json.dumps(last, allow_nan=False) + "\n")
                        if writer is not None:
                            for k in ("loss", "grad_norm", "lr", "images_per_s"):
                                if last[k] is not None:
                                    writer.add_scalar(f"train/{k}", last[k], self.step)
                    if last["loss"] is not None:
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
        """A grid of EMA samples, one row per class (per prompt for a text model), from a
        fixed noise seed."""
        if self.conditioning.kind == "text":
            from .text_outputs import save_prompt_grid

            save_prompt_grid(self, path)
            return
        from .outputs import sample_classes
        from ..utils.images import save_grid_png

        imgs, _ = sample_classes(self.ema, self.dataset.shape, self.dataset.num_classes, per_class,
                                 self.cfg.sample, seed=self.cfg.train.seed, amp_dtype=self.amp_dtype,
                                 device=self.device, shift=self.cfg.flow.shift)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid_png(imgs, path, nrow=per_class)
