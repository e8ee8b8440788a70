"""Training flowdit's own latent space: a KL autoencoder (diffusers' ``AutoencoderKL``)
on a data set, then its latent statistics, reconstruction scores and a latent cache.

The loss is the one of the latent-diffusion autoencoders (Rombach et al. 2022; the
``LPIPSWithDiscriminator`` of CompVis/latent-diffusion without its adversarial term and
with a fixed log-variance of 0), divided by the number of pixels ``P = C H W``:

    L = mean |x - D(z)| + w_p * d(x, D(z)) + w_kl * KL(q(z|x) || N(0, I)) / P,

with ``z`` a posterior sample, ``d`` the LPIPS-style distance on the data set's guide
network (:class:`flowdit.distill.perceptual.FeatureDistance`: flowdit's own features,
never the evaluator's) and the KL summed over latent elements. The reference's defaults
(``kl_weight 1e-6``, ``perceptual_weight 1``) are kept.

When training ends, the shift and scale that normalise the latents are computed from
posterior samples of training images (:func:`flowdit.models.autoencoder.latent_statistics`),
and the autoencoder is written as a diffusers folder (``<run>/autoencoder``) with them in
its config, loadable by :meth:`flowdit.models.autoencoder.LatentSpace.from_pretrained`.
``flowdit autoencoder train`` does all of it; a killed run resumes from its last
checkpoint (``--resume``), with the same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from tqdm.auto import tqdm

from ..errors import CheckpointError, ConfigError
from ..models.autoencoder import AutoencoderConfig, LatentSpace, build_autoencoder, latent_statistics
from ..utils.config import save_config, to_dict
from ..utils.files import DirLock, check_writable, finite_or_none, write_json
from ..utils.precision import autocast, autocast_dtype
from ..utils.seeding import seeded_generator
from .checkpoint import checkpoint_candidates, load_checkpoint, load_state_dict_strict, save_checkpoint
from .sections import absolute_path, key, non_negative, positive

__all__ = ["AutoencoderRunConfig", "AutoencoderTrainer", "autoencoder_loss", "load_training_images",
           "reconstruction_report"]


@dataclass
class AEDataSection:
    """The images the autoencoder learns: ``shapes`` renders ``train_size`` scenes of
    ``seed`` (any side), the other data sets are read whole."""

    dataset: str = key("shapes", "shapes (rendered scenes), digits, mnist or folder")
    root: Optional[str] = key(None, "directory of the data set's files (mnist, folder)")
    image_size: int = key(64, "image side (shapes: rendered at it; folder: resized to it)")
    train_size: int = key(20000, "shapes: number of training scenes rendered")
    seed: int = key(0, "shapes: seed of the rendered scenes")

    def validate(self) -> None:
        from ..data import DATASET_NAMES

        if self.dataset not in DATASET_NAMES:
            raise ConfigError(f"data.dataset: unknown data set {self.dataset!r}; valid: {', '.join(DATASET_NAMES)}")
        positive("data", self, "image_size", "train_size")


@dataclass
class AELossSection:
    """Weights of the three terms (module docstring)."""

    l1: float = key(1.0, "weight of the mean absolute pixel error")
    perceptual: float = key(1.0, "weight of the guide-network LPIPS-style distance (0: none)")
    kl: float = key(1e-6, "weight of the posterior KL (summed over latent elements, divided by pixels)")
    weights_dir: Optional[str] = key(None, "directory of the guide network (default: the shipped networks)")

    def validate(self) -> None:
        non_negative("loss", self, "l1", "perceptual", "kl")
        if self.l1 + self.perceptual == 0:
            raise ConfigError("loss.l1 and loss.perceptual are both 0: nothing asks for reconstructions")


@dataclass
class AEOptimSection:
    """AdamW with linear warm-up and gradient clipping."""

    lr: float = key(1e-3, "peak learning rate")
    weight_decay: float = key(0.0, "AdamW decoupled weight decay")
    warmup_steps: int = key(200, "linear warm-up steps")
    grad_clip: float = key(1.0, "clip the gradient norm to this (0: none)")

    def validate(self) -> None:
        positive("optim", self, "lr")
        non_negative("optim", self, "weight_decay", "warmup_steps", "grad_clip")


@dataclass
class AETrainSection:
    steps: int = key(3000, "optimizer steps")
    batch_size: int = key(32, "images per step")
    precision: Literal["auto", "bf16", "fp32"] = key("auto", "auto: bf16 autocast where it runs natively")
    seed: int = key(0, "seed of the weights, the data order and the posterior samples")
    log_every: int = key(50, "append to metrics.jsonl every this many steps")
    ckpt_every: int = key(500, "checkpoint every this many steps (0: only at the end)")
    keep_ckpts: int = key(2, "checkpoints kept")
    eval_size: int = key(1000, "test images scored at the end (PSNR, SSIM, judge)")

    def validate(self) -> None:
        positive("train", self, "steps", "batch_size", "log_every", "keep_ckpts", "eval_size")
        non_negative("train", self, "ckpt_every", "seed")


@dataclass
class AutoencoderRunConfig:
    """An autoencoder training run, written to ``<out_dir>/<name>/``."""

    name: str = key("shapes-ae", "run name: the run directory is out_dir/name")
    out_dir: str = key("runs", "directory holding the runs")
    model: AutoencoderConfig = key(factory=AutoencoderConfig)
    data: AEDataSection = key(factory=AEDataSection)
    loss: AELossSection = key(factory=AELossSection)
    optim: AEOptimSection = key(factory=AEOptimSection)
    train: AETrainSection = key(factory=AETrainSection)

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"name must be a plain directory name, got {self.name!r}")
        if self.data.image_size % self.model.factor:
            raise ConfigError(f"data.image_size {self.data.image_size} is not a multiple of the autoencoder's "
                              f"factor {self.model.factor} (model.block_out_channels)")

    def resolved(self) -> "AutoencoderRunConfig":
        import dataclasses

        return dataclasses.replace(
            self, data=dataclasses.replace(self.data, root=absolute_path(self.data.root)),
            loss=dataclasses.replace(self.loss, weights_dir=absolute_path(self.loss.weights_dir)))


def load_training_images(data: AEDataSection, split: str = "train", n: Optional[int] = None):
    """The data set of ``split`` as an image data set (``shapes``: ``n`` or
    ``data.train_size`` rendered scenes, with captions and graphs)."""
    from ..data import build_dataset
    from ..data.shapes import DATASET_SIZES, load_shapes

    if data.dataset == "shapes":
        size = n or (data.train_size if split == "train" else DATASET_SIZES[split])
        return load_shapes(split, data.image_size, n=size, seed=data.seed)
    image_size = data.image_size if data.dataset == "folder" else None
    return build_dataset(data.dataset, root=data.root, split=split, image_size=image_size)


def autoencoder_loss(vae: torch.nn.Module, x: torch.Tensor, cfg: AELossSection, perceptual=None,
                     generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict]:
    """The loss of the module docstring for images ``x [B, C, H, W]`` in [-1, 1], and its
    terms (floats): ``l1``, ``perceptual``, ``kl`` (per image, summed over latent elements)."""
    post = vae.encode(x).latent_dist
    noise = torch.randn(post.mean.shape, generator=generator, dtype=torch.float32).to(post.mean.device)
    z = post.mean + post.std * noise.to(post.mean.dtype)
    rec = vae.decode(z).sample.float()
    pixels = x[0].numel()
    l1 = (rec - x).abs().mean()
    kl = post.kl().float().mean()
    loss = cfg.l1 * l1 + cfg.kl * kl / pixels
    p = torch.zeros((), device=x.device)
    if perceptual is not None and cfg.perceptual > 0:
        p = perceptual(rec, x).mean()
        loss = loss + cfg.perceptual * p
    return loss, {"l1": float(l1.detach()), "perceptual": float(p.detach()), "kl": float(kl.detach())}


class AutoencoderTrainer:
    """``AutoencoderTrainer(cfg).fit()`` trains, then writes ``<run>/autoencoder`` (the
    diffusers folder with its latent factors) and ``<run>/metrics.json``."""

    def __init__(self, cfg: AutoencoderRunConfig, resume: bool = False, progress: bool = True):
        self.cfg = cfg.resolved()
        self.run_dir = Path(self.cfg.out_dir) / self.cfg.name
        self.progress = progress
        check_writable(self.run_dir, "out_dir")
        if not resume and (checkpoint_candidates(self.run_dir) or (self.run_dir / "config.yaml").exists()):
            raise ConfigError(f"{self.run_dir} already holds a run: pass --resume to continue it, or choose another name=")
        self._lock = DirLock(self.run_dir).acquire()
        tc = self.cfg.train
        self.perceptual = self._perceptual()  # before the data: a missing guide network fails fast
        self.images = load_training_images(self.cfg.data, "train")
        torch.manual_seed(tc.seed)
        self.vae = build_autoencoder(self.cfg.model)
        self.opt = torch.optim.AdamW(self.vae.parameters(), lr=self.cfg.optim.lr,
                                     weight_decay=self.cfg.optim.weight_decay)
        self.amp = autocast_dtype(tc.precision, torch.device("cpu"))
        self.step = 0
        if resume:
            self._resume()

    def _perceptual(self):
        if self.cfg.loss.perceptual == 0:
            return None
        from ..distill.perceptual import FeatureDistance
        from ..eval.evaluator import WEIGHTS_DIR, load_classifier

        wd = Path(self.cfg.loss.weights_dir) if self.cfg.loss.weights_dir else WEIGHTS_DIR
        try:
            net, _ = load_classifier(self.cfg.data.dataset, "guide", wd)
        except Exception as e:
            raise ConfigError(f"loss.perceptual: {str(e).splitlines()[0]} (or set loss.perceptual=0)") from None
        return FeatureDistance(net)

    def _resume(self) -> None:
        for path in checkpoint_candidates(self.run_dir):
            try:
                ckpt = load_checkpoint(path, map_location="cpu")
            except CheckpointError as e:
                raise CheckpointError(f"{e} -- move it aside to resume from an older checkpoint") from None
            saved = ckpt.meta.get("config")
            if saved is not None and {k: v for k, v in saved.items() if k != "train"} != \
                    {k: v for k, v in to_dict(self.cfg).items() if k != "train"}:
                raise ConfigError(f"--resume: {path} was trained with another model, data or loss config")
            load_state_dict_strict(self.vae, ckpt.tensors["vae"], "vae")
            self.opt.load_state_dict(ckpt.trainer_state["optimizer"])
            self.step = int(ckpt.trainer_state["step"])
            print(f"flowdit: resumed from {path} at step {self.step}")
            return
        print(f"flowdit: no checkpoint in {self.run_dir}; starting from step 0")

    def _save(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, {"vae": self.vae.state_dict()},
                               {"step": self.step, "optimizer": self.opt.state_dict()},
                               {"config": to_dict(self.cfg)}, keep_last=self.cfg.train.keep_ckpts)

    def _batch(self, step: int) -> torch.Tensor:
        # The trainer's epoch permutations seeded by (seed, epoch): the batches do not depend on resumes.
        from .trainer import global_batch_indices

        tc = self.cfg.train
        return self.images.batch(global_batch_indices(step, tc.batch_size, len(self.images), tc.seed))[0]

    def fit(self) -> dict:
        try:
            return self._fit()
        finally:
            self._lock.release()

    def _fit(self) -> dict:
        tc, oc = self.cfg.train, self.cfg.optim
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not (self.run_dir / "config.yaml").exists():
            save_config(self.cfg, self.run_dir / "config.yaml")
        bar = tqdm(total=tc.steps, initial=self.step, desc="autoencoder", disable=not self.progress, dynamic_ncols=True)
        window: dict[str, float] = {}
        t0 = time.perf_counter()
        self.vae.train()
        while self.step < tc.steps:
            x = self._batch(self.step)
            lr = oc.lr * min(1.0, (self.step + 1) / oc.warmup_steps) if oc.warmup_steps else oc.lr
            for g in self.opt.param_groups:
                g["lr"] = lr
            with autocast("cpu", self.amp):
                loss, terms = autoencoder_loss(self.vae, x, self.cfg.loss, self.perceptual,
                                               seeded_generator(tc.seed, 2, self.step))
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(self.vae.parameters(), oc.grad_clip or float("inf"))
            if not (math.isfinite(float(loss.detach())) and math.isfinite(float(gn))):
                raise FloatingPointError(f"autoencoder training diverged at step {self.step + 1} (loss {float(loss.detach())}); "
                                         "nothing saved after the last checkpoint: resume with a lower optim.lr")
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            bar.update(1)
            for k, v in dict(terms, loss=float(loss.detach())).items():
                window[k] = window.get(k, 0.0) + v
            if self.step % tc.log_every == 0 or self.step == tc.steps:
                n = tc.log_every if self.step % tc.log_every == 0 else self.step % tc.log_every
                row = finite_or_none({"step": self.step, **{k: v / n for k, v in window.items()}, "lr": lr,
                                      "images_per_s": n * tc.batch_size / (time.perf_counter() - t0)})
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(l1=f"{row['l1']:.4f}", ips=f"{row['images_per_s']:.0f}")
                window, t0 = {}, time.perf_counter()
            if tc.ckpt_every and self.step % tc.ckpt_every == 0 and self.step < tc.steps:
                self._save()
        bar.close()
        self._save()
        return self.finish()

    @torch.no_grad()
    def finish(self) -> dict:
        """Latent factors from training images, the diffusers folder, and the test report."""
        self.vae.eval()
        n = min(len(self.images), 2000)
        batches = (self.images.batch(torch.arange(i, min(i + 200, n)))[0] for i in range(0, n, 200))
        shift, scale = latent_statistics(self.vae, batches, seed=self.cfg.train.seed)
        space = LatentSpace(self.vae, scale, shift)
        folder = self.run_dir / "autoencoder"
        space.save_pretrained(str(folder))
        test = load_training_images(self.cfg.data, "test", n=self.cfg.train.eval_size)
        report = reconstruction_report(space, test, progress=self.progress)
        report.update({"steps": self.step, "shift_factor": shift, "scaling_factor": scale,
                       "params": sum(p.numel() for p in self.vae.parameters()), "autoencoder": "autoencoder"})
        write_json(self.run_dir / "metrics.json", report)
        return report


@torch.no_grad()
def reconstruction_report(space: LatentSpace, data, batch_size: int = 100, progress: bool = False) -> dict:
    """PSNR and SSIM (dB / unitless, means over images) of ``decode(encode(x))`` on a
    data set, and, for captioned scenes (``data.graphs``), the judge's exact match on the
    originals and on the reconstructions."""
    from ..data.base import to_uint8
    from ..eval.pixel import psnr, ssim

    ps, ss, recs = [], [], []
    for lo in tqdm(range(0, len(data), batch_size), desc="reconstruct", disable=not progress):
        x = data.batch(torch.arange(lo, min(lo + batch_size, len(data))))[0]
        r = space.decode(space.encode(x)).clamp(-1, 1)
        ps.append(psnr(r, x))
        ss.append(ssim(r, x))
        recs.append(to_uint8(r))
    out = {"images": len(data), "psnr": float(torch.cat(ps).mean()), "ssim": float(torch.cat(ss).mean())}
    graphs = getattr(data, "graphs", None)
    if graphs:
        from ..eval.shapes_judge import score, summarise

        rec = torch.cat(recs)
        out["judge_reconstructions"] = summarise([score(rec[i], g) for i, g in enumerate(graphs)])
        out["judge_originals"] = summarise([score(data.images[i], g) for i, g in enumerate(graphs)])
    return out


@torch.no_grad()
def encode_dataset(space: LatentSpace, data, out: str | Path, batch_size: int = 200, shard_size: int = 8192,
                   source: Optional[dict] = None, progress: bool = False) -> Path:
    """Encode every image of ``data`` (posterior means, normalised by the space's factors)
    and write them with their labels and captions as a latent cache
    (:func:`flowdit.data.latent_cache.write_latent_cache`)."""
    from ..data.latent_cache import write_latent_cache

    zs = []
    for lo in tqdm(range(0, len(data), batch_size), desc="encode", disable=not progress):
        zs.append(space.encode(data.batch(torch.arange(lo, min(lo + batch_size, len(data))))[0]).float())
    meta = {"autoencoder": space.describe(), "source": source or {},
            "data": {"name": data.name, "split": data.split, "num_classes": data.num_classes,
                     "class_names": list(data.class_names), "image_shape": list(data.shape)}}
    return write_latent_cache(out, torch.cat(zs), data.labels, getattr(data, "captions", None), meta, shard_size)
