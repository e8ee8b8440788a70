"""Latent caches, autoencoder training and text-conditioned training (MMDiT) end to end."""

import json

import pytest
import torch

pytest.importorskip("diffusers")

from flowdit.cli.main import main  # noqa: E402
from flowdit.data.latent_cache import load_latent_cache, write_latent_cache  # noqa: E402
from flowdit.data.shapes import scene_set  # noqa: E402
from flowdit.errors import ConfigError, DataError  # noqa: E402
from flowdit.train.autoencoder import AutoencoderRunConfig, AutoencoderTrainer, autoencoder_loss  # noqa: E402
from flowdit.train.conditioning import TextBatch, TextConditioning  # noqa: E402
from flowdit.train.config import RunConfig  # noqa: E402
from flowdit.train.trainer import Trainer  # noqa: E402
from flowdit.utils.config import from_dict  # noqa: E402
from flowdit.models.text_encoder import HashEncoder  # noqa: E402


def _cache(path, n=24, shape=(4, 8, 8), seed=0):
    scenes = scene_set("train", n)
    z = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    write_latent_cache(path, z, torch.arange(n) % 5, [s.captions for s in scenes],
                       {"data": {"name": "shapes", "num_classes": 72}}, shard_size=10)
    return z, scenes


def test_latent_cache_round_trips_and_refuses_damage(tmp_path):
    z, scenes = _cache(tmp_path / "c")
    d = load_latent_cache(tmp_path / "c")
    assert len(d) == 24 and d.shape == (4, 8, 8) and d.captions[3] == scenes[3].captions
    torch.testing.assert_close(d.latents.float(), z.half().float(), rtol=0, atol=0)
    assert d.batch(torch.tensor([5, 1]))[1].tolist() == [0, 1]
    with pytest.raises(DataError, match="already holds"):
        _cache(tmp_path / "c")
    shard = tmp_path / "c" / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard_00001.safetensors: checksum mismatch"):
        load_latent_cache(tmp_path / "c")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no index.json"):
        load_latent_cache(tmp_path / "d")


def test_text_conditioning_draws_paraphrases_and_the_empty_prompt(tmp_path):
    caps = [["a red circle", "one red circle"], ["a blue star"], ["a green ring", "the green ring", "green ring"]]
    cond = TextConditioning(caps, HashEncoder(dim=16, max_length=8), tmp_path, progress=False)
    assert cond.texts[0] == ""  # row 0 is the null condition
    idx = torch.tensor([0, 1, 2, 2, 0])
    drop = torch.tensor([False, False, False, False, True])
    seen = set()
    for step in range(40):
        rows = cond.caption_rows(idx, drop, cond.draw(step, 0, 5))
        texts = [cond.texts[r] for r in rows.tolist()]
        assert texts[0] in caps[0] and texts[1] == "a blue star" and texts[2] in caps[2] and texts[4] == ""
        seen.add(texts[2])
    assert seen == set(caps[2])  # every paraphrase is drawn
    # Same step, same draw: a resumed run sees the same captions.
    torch.testing.assert_close(cond.draw(7, 0, 5), cond.draw(7, 0, 5))
    enc = HashEncoder(dim=16, max_length=8).encode(["a blue star"])
    b = cond.condition(idx, idx, drop, cond.draw(0, 0, 5))
    assert isinstance(b, TextBatch) and b["tokens"].shape == (5, 8, 16)
    torch.testing.assert_close(b["pooled"][1], enc["pooled"][0].float(), rtol=0, atol=1e-6)
    assert b[1:3]["tokens"].shape[0] == 2 and len(b[torch.tensor([0, 4])]) == 2


def _text_cfg(tmp_path, **over):
    d = {"name": "t2i", "out_dir": str(tmp_path / "runs"), "model": {"name": "MMDiT-hash-tiny"},
         "data": {"dataset": "shapes", "latents": str(tmp_path / "c")},
         "text": {"encoder": "hash", "cache_dir": str(tmp_path / "tc")},
         "train": {"steps": 4, "batch_size": 8, "log_every": 2, "ckpt_every": 2}}
    for k, v in over.items():
        d.setdefault(k, {}).update(v) if isinstance(v, dict) else d.__setitem__(k, v)
    return from_dict(RunConfig, d)


def test_text_training_resumes_exactly_and_refuses_mismatches(tmp_path):
    _cache(tmp_path / "c")
    full = Trainer(_text_cfg(tmp_path, name="full"), progress=False)
    full.fit()
    part = Trainer(_text_cfg(tmp_path, name="part", train={"steps": 2}), progress=False)
    part.fit()
    resumed = Trainer(_text_cfg(tmp_path, name="part"), resume=True, progress=False)
    resumed.fit()
    for a, b in zip(full.ema.parameters(), resumed.ema.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    from flowdit.inference.loading import load_run_model

    model, meta = load_run_model(tmp_path / "runs" / "full")
    assert type(model).__name__ == "MMDiT" and meta["text"]["encoder"] == "hash"
    with pytest.raises(ConfigError, match="text-conditioned: set text.encoder"):
        _text_cfg(tmp_path, text={"encoder": None})
    with pytest.raises(ConfigError, match="class-conditional"):
        _text_cfg(tmp_path, model={"name": "DiT-tiny"})


def test_autoencoder_loss_is_the_scaled_latent_diffusion_loss():
    from flowdit.models.autoencoder import AutoencoderConfig, build_autoencoder

    torch.manual_seed(0)
    vae = build_autoencoder(AutoencoderConfig(block_out_channels=[8, 16], norm_num_groups=8))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    cfg = AutoencoderRunConfig().loss
    cfg.perceptual = 0.0
    loss, terms = autoencoder_loss(vae, x, cfg, generator=torch.Generator().manual_seed(3))
    # Restated: LPIPSWithDiscriminator (CompVis/latent-diffusion, ldm/modules/losses/contperceptual.py)
    # with logvar 0 and no GAN: sum|x - rec| / B + kl_weight * sum KL / B, here divided by C H W.
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(3))
    rec = vae.decode(z).sample
    ref = ((x - rec).abs().sum() / 2 + 1e-6 * post.kl().sum() / 2) / x[0].numel()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)


def test_autoencoder_cli_trains_encodes_and_a_text_run_samples(tmp_path, capsys):
    run = tmp_path / "runs"
    args = ["autoencoder", "train", f"out_dir={run}", "name=ae", "data.train_size=16", "data.image_size=32",
            "model.block_out_channels=[8,16,16]", "model.norm_num_groups=8", "loss.perceptual=0", "train.steps=2",
            "train.batch_size=4", "train.eval_size=4"]
    assert main(args) == 0
    report = json.loads((run / "ae" / "metrics.json").read_text())
    assert report["judge_originals"]["n"] == 4 and report["scaling_factor"] > 0
    assert main(args) == 2 and "already holds a run" in capsys.readouterr().err
    assert main(["autoencoder", "encode", "--autoencoder", str(run / "ae"), "--n", "12", "--image-size", "32",
                 "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    cache = load_latent_cache(tmp_path / "c")
    assert cache.shape == (4, 8, 8) and len(cache.captions) == 12
    assert cache.meta["source"]["autoencoder"].endswith("autoencoder")
    # A text run on those latents, sampled from prompts and decoded through the autoencoder.
    assert main(["train", "--no-progress", f"out_dir={run}", "name=t2i", "model.name=MMDiT-hash-tiny",
                 "data.dataset=shapes", f"data.latents={tmp_path / 'c'}", "text.encoder=hash",
                 f"text.cache_dir={tmp_path / 'tc'}", "train.steps=2", "train.batch_size=4",
                 "sample.num_eval=5", "sample.steps=2"]) == 0
    metrics = json.loads((run / "t2i" / "metrics.json").read_text())
    assert metrics["judge_test"]["n"] == 5 and metrics["judge_heldout"]["n"] == 1
    out = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(run / "t2i"), "--prompt", "a red circle", "--prompt", "a blue star",
                 "-n", "2", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    import numpy as np

    f = np.load(out)
    assert f["arr_0"].shape == (4, 32, 32, 3) and list(f["prompts"]) == ["a red circle"] * 2 + ["a blue star"] * 2
    assert main(["sample", "--ckpt", str(run / "t2i"), "--steps", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "text-conditioned run" in capsys.readouterr().err
    # Other sizes: latents of H / 4 x W / 4 (the autoencoder's factor), decoded to H x W.
    assert main(["sample", "--ckpt", str(run / "t2i"), "--prompt", "a red circle", "--height", "48", "--width", "16",
                 "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    assert np.load(out)["arr_0"].shape == (1, 48, 16, 3)
    capsys.readouterr()
    for extra, message in ((["--height", "30"], "height must be a positive multiple of 8 pixels"),
                           (["--rope-scaling", "ntk"], "--rope-scaling needs a model with RoPE positions")):
        assert main(["sample", "--ckpt", str(run / "t2i"), "--prompt", "a red circle", *extra, "--steps", "2",
                     "--out", str(tmp_path / "y.npz"), "--no-progress"]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "y.npz").exists()
    assert main(["sample", "--ckpt", str(run / "t2i"), "--height", "64", "--out", str(tmp_path / "y.npz")]) == 2
    assert "--height applies to prompts" in capsys.readouterr().err


def test_edit_cli_takes_prompts_for_a_text_run_and_refuses_mixtures(tmp_path, capsys):
    run = tmp_path / "runs"
    assert main(["autoencoder", "train", "--no-progress", f"out_dir={run}", "name=ae", "data.train_size=8",
                 "data.image_size=32", "model.block_out_channels=[8,16,16]", "model.norm_num_groups=8",
                 "loss.perceptual=0", "train.steps=1", "train.batch_size=4", "train.eval_size=2"]) == 0
    assert main(["autoencoder", "encode", "--autoencoder", str(run / "ae"), "--n", "8", "--image-size", "32",
                 "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    assert main(["train", "--no-progress", "--no-outputs", f"out_dir={run}", "name=t2i", "model.name=MMDiT-hash-tiny",
                 "data.dataset=shapes", f"data.latents={tmp_path / 'c'}", "text.encoder=hash",
                 f"text.cache_dir={tmp_path / 'tc'}", "train.steps=1", "train.batch_size=4"]) == 0
    from PIL import Image

    from flowdit.data.shapes import make_scene

    Image.fromarray(make_scene(0, "test", height=32, width=32).image.transpose(1, 2, 0)).save(tmp_path / "in.png")
    base = ["edit", "--ckpt", str(run / "t2i"), "--input", str(tmp_path / "in.png"), "--steps", "2"]
    assert main(base + ["--source-prompt", "a red circle", "--target-prompt", "a blue circle", "--cfg", "2",
                        "--out", str(tmp_path / "e.npz")]) == 0
    import numpy as np

    assert np.load(tmp_path / "e.npz")["arr_0"].shape == (1, 32, 32, 3)
    capsys.readouterr()
    for extra, names in ((["--target", "1", "--target-prompt", "x"], "one of the two"),
                         (["--source", "1", "--target-prompt", "x"], "--source-prompt"),
                         (["--source-prompt", "x", "--target", "1"], "--source-prompt needs --target-prompt")):
        assert main(base + extra + ["--out", str(tmp_path / "f.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and names in err[0], err
    assert not (tmp_path / "f.png").exists()


def test_autoencoder_resume_equals_an_uninterrupted_run(tmp_path):
    def cfg(name, steps):
        return from_dict(AutoencoderRunConfig, {
            "name": name, "out_dir": str(tmp_path), "data": {"train_size": 6, "image_size": 32},
            "model": {"block_out_channels": [8, 16], "norm_num_groups": 8}, "loss": {"perceptual": 0},
            "train": {"steps": steps, "batch_size": 4, "ckpt_every": 2, "eval_size": 2, "log_every": 1}})

    full = AutoencoderTrainer(cfg("full", 4), progress=False)
    full.fit()
    AutoencoderTrainer(cfg("part", 2), progress=False).fit()
    resumed = AutoencoderTrainer(cfg("part", 4), resume=True, progress=False)
    assert resumed.step == 2
    resumed.fit()
    for a, b in zip(full.vae.state_dict().values(), resumed.vae.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="already holds a run"):
        AutoencoderTrainer(cfg("full", 4), progress=False)
