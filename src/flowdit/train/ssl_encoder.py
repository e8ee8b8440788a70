"""Training :class:`flowdit.models.ssl_encoder.SSLEncoder` without labels, SimCLR-style
(Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

Each step draws a batch of ``N`` images and two random views of each (:func:`augment`: a
random resized crop with rotation, as one affine warp; random erasing; Gaussian noise; no
flips, which would turn digits into other symbols). Both views go through the encoder's
pooled features and a 2-layer projection head ``g`` (used only here), and the NT-Xent loss
(:func:`nt_xent`) pulls each pair together against the other ``2N - 2`` views of the batch:

    l(i, j) = -log( exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) ),
    L = 1 / (2N) sum_i l(i, pair(i)),        sim = cosine similarity.

Every random draw comes from a generator seeded by ``(seed, stream, step)`` and the batches
from the trainer's per-epoch permutations, so a run is reproducible and a killed run resumed
from a checkpoint (``--resume``) ends with the same weights as an uninterrupted one.

At the end the encoder is written as ``encoder.safetensors`` with ``manifest.json`` (SHA-256,
architecture; :func:`flowdit.models.ssl_encoder.load_ssl_encoder` reads it), and the
representation is scored by a **linear probe**: multinomial logistic regression on the
frozen pooled features of the train split, scored on the test split (the labels are used
only there), next to the same probe on the encoder's random initialisation.
``metrics.json`` holds both.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import CheckpointError, ConfigError
from ..models.ssl_encoder import ENCODER_FILE, MANIFEST_FILE, SSLEncoder, encoder_manifest
from ..utils.config import save_config, to_dict
from ..utils.files import DirLock, atomic_write, check_writable, finite_or_none, sha256_file, write_json
from ..utils.precision import autocast, autocast_dtype
from ..utils.seeding import seeded_generator
from .checkpoint import checkpoint_candidates, load_checkpoint, load_state_dict_strict, save_checkpoint
from .ssl_config import DATASETS, RESUME_FREE_KEYS, SSLTrainConfig, _flag

__all__ = ["SSLTrainConfig", "SSLEncoderTrainer", "ProjectionHead", "augment", "nt_xent", "linear_probe",
           "pooled_features", "RESUME_FREE_KEYS", "DATASETS"]

_AUG_STREAM = 11  # generator stream of the views, apart from the trainer's data stream (1)


class ProjectionHead(nn.Module):
    """SimCLR's projection ``g``: ``[B, F] -> Linear -> ReLU -> Linear -> [B, out]``; trained
    with the encoder and thrown away after."""

    def __init__(self, in_dim: int, hidden: int, out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h [B, F] -> z [B, out]``."""
        return self.net(h)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The NT-Xent loss of SimCLR (module docstring) for paired embeddings ``z1, z2 [N, D]``
    (row ``i`` of each: two views of image ``i``); a float32 scalar, the mean over all
    ``2N`` anchors. Embeddings need not be normalised (cosine similarity is used)."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64).float()


@torch.no_grad()
def augment(x: torch.Tensor, g: torch.Generator, cfg: SSLTrainConfig) -> torch.Tensor:
    """One random view of each image of ``x [B, C, H, W]`` in [-1, 1], same shape, drawn
    from ``g`` (on the CPU, then moved to ``x``'s device; a fixed order of draws).

    1. random resized crop with rotation, as one affine warp (bilinear, background -1): a
       window of area ``U(crop_min, crop_max)`` times the image (above 1 zooms out), aspect
       ratio log-uniform in [1 / aspect, aspect], rotated by ``U(-rotate, rotate)`` degrees, centred
       ``U(-translate, translate)`` of the side off the middle, resized to the image;
    2. with probability ``erase_p`` a rectangle of 2-20% of the area (aspect 0.3-3.3) set to
       uniform noise in [-1, 1] (random erasing, Zhong et al. 2020);
    3. Gaussian noise of std ``U(0, noise)``, then clamped to [-1, 1].
    No horizontal or vertical flips: a flipped digit is another symbol.
    """
    B, C, H, W = x.shape
    dev = x.device
    area = _uniform(g, B, cfg.crop_min, cfg.crop_max)
    log_aspect = _uniform(g, B, -math.log(cfg.aspect), math.log(cfg.aspect))
    angle = _uniform(g, B, -cfg.rotate, cfg.rotate) * (math.pi / 180)
    shift = _uniform(g, 2 * B, -cfg.translate, cfg.translate).view(B, 2) * 2  # normalised coords span 2
    sx = area.sqrt() * (log_aspect / 2).exp()
    sy = area.sqrt() * (-log_aspect / 2).exp()
    cos, sin = angle.cos(), angle.sin()
    # theta maps output coordinates to input ones (F.affine_grid): rotate, scale, then shift.
    theta = torch.stack([torch.stack([sx * cos, -sy * sin, shift[:, 0]], 1),
                         torch.stack([sx * sin, sy * cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(dev), [B, C, H, W], align_corners=False)
    v = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1

    erase = torch.rand(B, generator=g) < cfg.erase_p
    e_area = _uniform(g, B, 0.02, 0.2) * H * W
    e_aspect = _uniform(g, B, math.log(0.3), math.log(1 / 0.3)).exp()
    eh = (e_area * e_aspect).sqrt().round().clamp(1, H)
    ew = (e_area / e_aspect).sqrt().round().clamp(1, W)
    top = (torch.rand(B, generator=g) * (H - eh + 1)).floor()
    left = (torch.rand(B, generator=g) * (W - ew + 1)).floor()
    fill = torch.rand(B, C, H, W, generator=g) * 2 - 1
    rows, cols = torch.arange(H).view(1, H, 1), torch.arange(W).view(1, 1, W)
    box = ((rows >= top.view(B, 1, 1)) & (rows < (top + eh).view(B, 1, 1)) & (cols >= left.view(B, 1, 1))
           & (cols < (left + ew).view(B, 1, 1)) & erase.view(B, 1, 1))
    v = torch.where(box.unsqueeze(1).to(dev), fill.to(dev), v)

    sigma = _uniform(g, B, 0.0, cfg.noise).view(B, 1, 1, 1)
    v = v + (sigma * torch.randn(B, C, H, W, generator=g)).to(dev)
    return v.clamp(-1, 1)


@torch.no_grad()
def pooled_features(enc: SSLEncoder, data, n: int = 0, batch_size: int = 500, device=None,
                    progress: bool = False, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [n, F] float32, labels [n])`` of the first ``n`` images of an
    :class:`flowdit.data.ImageDataset` (``n = 0``: all), by ``enc.features`` in eval mode, fp32."""
    n = len(data) if n <= 0 else min(n, len(data))
    device = device or next(enc.parameters()).device
    was_training = enc.training
    enc.eval()
    feats = []
    for lo in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
        x, _ = data.batch(torch.arange(lo, min(lo + batch_size, n)), device=device)
        feats.append(enc.features(x).float().cpu())
    enc.train(was_training)
    return torch.cat(feats), data.labels[:n].clone()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, l2: float = 1e-4, max_iter: int = 300) -> dict:
    """Multinomial logistic regression on frozen features, the linear-probe score.

    ``train_x [N, F]``, ``train_y [N]``, ``test_x [M, F]``, ``test_y [M]``. Features are
    standardised with the train split's mean and std; the weights ``[F, K]`` and biases
    ``[K]`` minimise ``mean cross-entropy + l2 * ||W||^2`` by full-batch L-BFGS (strong Wolfe
    line search, float64, deterministic). Returns ``train_accuracy``, ``test_accuracy``
    (fractions), ``train_size``, ``test_size``, ``final_loss``.
    """
    xtr, xte = train_x.double(), test_x.double()
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    W = torch.zeros(xtr.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ W + b, train_y) + l2 * W.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        loss = F.cross_entropy(xtr @ W + b, train_y) + l2 * W.square().sum()
        acc_tr = float(((xtr @ W + b).argmax(1) == train_y).double().mean())
        acc_te = float(((xte @ W + b).argmax(1) == test_y).double().mean())
    return {"test_accuracy": acc_te, "train_accuracy": acc_tr, "train_size": len(train_y),
            "test_size": len(test_y), "final_loss": float(loss)}


def _lr(cfg: SSLTrainConfig, step: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, then cosine decay to 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))


def load_data(cfg: SSLTrainConfig, split: str):
    """The ``split`` of the configured data set (:func:`flowdit.data.build_dataset`), or a
    one-line :class:`ConfigError` naming ``--root`` / ``--dataset``."""
    from ..data import build_dataset
    from ..errors import DataError

    try:
        return build_dataset(cfg.dataset, root=cfg.root, split=split, image_size=cfg.image_size)
    except DataError as e:
        flag = "--root" if cfg.dataset != "digits" else "--dataset"
        raise ConfigError(f"{flag}: {str(e).splitlines()[0]}") from None


class SSLEncoderTrainer:
    """``SSLEncoderTrainer(cfg).fit()`` trains the encoder, then writes
    ``<out>/encoder.safetensors``, ``<out>/manifest.json`` and ``<out>/metrics.json``
    (linear probe of the trained and of the randomly initialised encoder), and returns the
    metrics. ``resume``: continue from the newest checkpoint in ``<out>``."""

    def __init__(self, cfg: SSLTrainConfig, resume: bool = False, progress: bool = True):
        from ..utils.device import resolve_device

        cfg.validate()
        self.cfg = cfg = cfg.resolved()
        self.run_dir = Path(cfg.out)
        self.progress = progress
        self.device = resolve_device(cfg.device)
        check_writable(self.run_dir, "--out")
        if not resume and (checkpoint_candidates(self.run_dir) or (self.run_dir / "config.yaml").exists()):
            raise ConfigError(f"--out {self.run_dir}: already holds a run; pass --resume to continue it, "
                              "or choose another directory")
        self._lock = DirLock(self.run_dir).acquire()
        try:
            self.data = load_data(cfg, "train")
            C, H, W = self.data.shape
            self.arch = cfg.arch(C, H)
            if H % self.arch.stride or W % self.arch.stride:
                raise ConfigError(f"--stride {self.arch.stride}: {cfg.dataset} images are {H}x{W}, not a multiple")
            torch.manual_seed(cfg.seed)
            self.encoder = SSLEncoder(self.arch).to(self.device)
            self.head = ProjectionHead(self.arch.feature_dim, cfg.proj_hidden, cfg.proj_dim).to(self.device)
            self.opt = torch.optim.AdamW(list(self.encoder.parameters()) + list(self.head.parameters()),
                                         lr=cfg.lr, weight_decay=cfg.weight_decay)
            self.amp = autocast_dtype(cfg.precision, self.device)
            self.step = self._saved_step = 0
            self.train_seconds = 0.0
            if resume:
                self._resume()
        except BaseException:
            self._lock.release()
            raise

    def _resume(self) -> None:
        for path in checkpoint_candidates(self.run_dir):
            try:
                ckpt = load_checkpoint(path, map_location="cpu")
            except CheckpointError as e:
                raise CheckpointError(f"{e} -- move it aside to resume from an older checkpoint") from None
            saved = ckpt.meta.get("config") or {}
            now = to_dict(self.cfg)
            diff = [k for k in now if k not in RESUME_FREE_KEYS and saved.get(k) != now[k]]
            if diff:
                k = diff[0]
                raise ConfigError(f"--resume: {path} was trained with {_flag(k)} {saved.get(k)}, not {now[k]} "
                                  f"(only {', '.join(_flag(k) for k in RESUME_FREE_KEYS)} may change)")
            load_state_dict_strict(self.encoder, ckpt.tensors["encoder"], "encoder")
            load_state_dict_strict(self.head, ckpt.tensors["head"], "head")
            self.opt.load_state_dict(ckpt.trainer_state["optimizer"])
            self.step = self._saved_step = int(ckpt.trainer_state["step"])
            self.train_seconds = float(ckpt.trainer_state.get("train_seconds", 0.0))
            print(f"flowdit: resumed from {path} at step {self.step}")
            return
        print(f"flowdit: no checkpoint in {self.run_dir}; starting from step 0")

    def _save(self) -> Path:
        self._saved_step = self.step
        return save_checkpoint(self.run_dir, self.step,
                               {"encoder": self.encoder.state_dict(), "head": self.head.state_dict()},
                               {"step": self.step, "optimizer": self.opt.state_dict(),
                                "train_seconds": self.train_seconds},
                               {"config": to_dict(self.cfg), "arch": self.arch.to_dict()},
                               keep_last=self.cfg.keep_ckpts)

    def _views(self, step: int) -> torch.Tensor:
        """The two views of step ``step``'s batch, stacked: ``[2N, C, H, W]`` (first views,
        then second views)."""
        from .trainer import global_batch_indices

        cfg = self.cfg
        idx = global_batch_indices(step, cfg.batch_size, len(self.data), cfg.seed)
        x = self.data.batch(idx)[0]
        g = seeded_generator(cfg.seed, _AUG_STREAM, step)
        return torch.cat([augment(x, g, cfg), augment(x, g, cfg)]).to(self.device)

    def train_step(self) -> dict:
        """One optimizer step on the views of ``self.step``; returns its loss and the
        contrastive top-1 accuracy (the positive is the most similar of the 2N - 1 others)."""
        cfg = self.cfg
        v = self._views(self.step)
        lr = _lr(cfg, self.step)
        for grp in self.opt.param_groups:
            grp["lr"] = lr
        with autocast(self.device.type, self.amp):
            z = self.head(self.encoder.features(v))
        z1, z2 = z.float().chunk(2)
        loss = nt_xent(z1, z2, cfg.temperature)
        loss.backward()
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"SSL training diverged at step {self.step + 1} (loss {float(loss)}); "
                                     "nothing saved after the last checkpoint: resume with a lower --lr")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            zn = F.normalize(z.detach().float(), dim=1)
            sim = (zn @ zn.T).fill_diagonal_(-2)
            n = z1.shape[0]
            pos = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(sim.device)
            acc = float((sim.argmax(1) == pos).float().mean())
        self.step += 1
        return {"loss": float(loss.detach()), "pair_accuracy": acc, "lr": lr}

    def fit(self) -> dict:
        """Train up to ``cfg.steps``, checkpointing, then :meth:`finish`; returns the metrics."""
        try:
            return self._fit()
        finally:
            self._lock.release()

    def _fit(self) -> dict:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        write_json(self.run_dir / "config.json", to_dict(self.cfg))
        bar = tqdm(total=cfg.steps, initial=self.step, desc="ssl encoder", disable=not self.progress,
                   dynamic_ncols=True)
        window: dict[str, float] = {}
        t0 = t_log = time.perf_counter()
        self.encoder.train()
        self.head.train()
        while self.step < cfg.steps:
            row = self.train_step()
            bar.update(1)
            for k, v in row.items():
                window[k] = window.get(k, 0.0) + v
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                n = cfg.log_every if self.step % cfg.log_every == 0 else self.step % cfg.log_every
                now = time.perf_counter()
                rec = finite_or_none({"step": self.step, **{k: v / n for k, v in window.items()}, "lr": row["lr"],
                                      "images_per_s": n * cfg.batch_size / (now - t_log)})
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['pair_accuracy']:.3f}")
                window, t_log = {}, now
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                self.train_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                self._save()
        bar.close()
        self.train_seconds += time.perf_counter() - t0
        if self._saved_step != self.step:
            self._save()
        return self.finish()

    def probe(self, enc: SSLEncoder, test_data, desc: str) -> dict:
        """The linear probe (:func:`linear_probe`) of ``enc``'s pooled features: fitted on
        the train split, scored on ``test_data``."""
        cfg = self.cfg
        ftr, ytr = pooled_features(enc, self.data, cfg.probe_train, device=self.device, progress=self.progress,
                                   desc=f"{desc}: train features")
        fte, yte = pooled_features(enc, test_data, cfg.probe_test, device=self.device, progress=self.progress,
                                   desc=f"{desc}: test features")
        return linear_probe(ftr, ytr, fte, yte, self.data.num_classes, l2=cfg.probe_l2)

    @torch.no_grad()
    def finish(self) -> dict:
        """Probe the trained encoder and its random initialisation, write
        ``encoder.safetensors``, ``manifest.json`` and ``metrics.json``; returns the metrics."""
        from safetensors.torch import save as st_save

        cfg = self.cfg
        test = load_data(cfg, "test")
        with torch.enable_grad():
            trained = self.probe(self.encoder, test, "trained")
            torch.manual_seed(cfg.seed)  # the same draws as the trained encoder's initialisation
            baseline = SSLEncoder(self.arch).to(self.device)
            random_init = self.probe(baseline, test, "random init")
        C, H, W = self.data.shape
        fmap = [self.arch.feature_dim, H // self.arch.stride, W // self.arch.stride]
        metrics = {
            "dataset": cfg.dataset, "steps": self.step, "batch_size": cfg.batch_size,
            "train_seconds": round(self.train_seconds, 1),
            "params": sum(p.numel() for p in self.encoder.parameters()),
            "image_shape": [C, H, W], "feature_map": fmap, "linear_probe": trained,
            "linear_probe_random_init": random_init,
            "encoder": ENCODER_FILE, "command": cfg.command(),
        }
        state = {k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()}
        blob = st_save(state, metadata={"format": "flowdit-ssl-encoder"})
        weights = atomic_write(self.run_dir / ENCODER_FILE, lambda f: f.write(blob), fsync=True)
        manifest = encoder_manifest(
            self.encoder, sha256_file(weights), dataset=cfg.dataset, image_shape=[C, H, W], feature_map=fmap,
            steps=self.step, seed=cfg.seed, linear_probe_test_accuracy=trained["test_accuracy"],
            linear_probe_random_init_test_accuracy=random_init["test_accuracy"], command=cfg.command())
        write_json(self.run_dir / MANIFEST_FILE, manifest)
        write_json(self.run_dir / "metrics.json", metrics)
        return metrics
