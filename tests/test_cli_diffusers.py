"""``flowdit sample --diffusers PATH``: tiny random SD3 and FLUX pipelines saved with
``save_pretrained`` (tiny CLIP / T5 tokenizers and text encoders, a tiny AutoencoderKL),
sampled through the command line.

The CLI's latents must equal ``DiffusersBridge.sample`` for the same prompts, seed and
settings, its decoded images the pipeline's own (Euler, where the bridge equals the
pipeline), and every bad invocation exits 2 with one line naming the flag or file, before
anything is loaded or written.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from flowdit.cli import main  # noqa: E402
from flowdit.interop.diffusers import DiffusersBridge, inspect_pipeline, pack_flux_latents  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def clip_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single letters (no merges), 8 tokens long."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=8)


def t5_tokenizer() -> T5TokenizerFast:
    """A unigram T5 tokenizer over single letters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)] + [(c, -1.0) for c in LETTERS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def clip_config(**kw) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, **kw)


def tiny_vae(scaling: float, shift: float) -> AutoencoderKL:
    """A 2-level AutoencoderKL (VAE factor 2, 4 latent channels) with the given factors."""
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=scaling,
                         shift_factor=shift).eval()


def sd3_pipeline() -> StableDiffusion3Pipeline:
    """SD3 with both CLIP encoders, no T5 (the pipeline pads with zeros) and a VAE."""
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                               num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                               pooled_projection_dim=32, out_channels=4, pos_embed_max_size=8).eval()
    te, te2 = (CLIPTextModelWithProjection(clip_config(projection_dim=16)).eval() for _ in range(2))
    return StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=tiny_vae(1.5305, 0.0609), text_encoder=te, tokenizer=clip_tokenizer(),
                                    text_encoder_2=te2, tokenizer_2=clip_tokenizer(), text_encoder_3=None,
                                    tokenizer_3=None)


def flux_pipeline() -> FluxPipeline:
    """FLUX-dev-like (guidance embedding) with CLIP, T5 and a VAE."""
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                pooled_projection_dim=16, axes_dims_rope=(2, 2, 4), guidance_embeds=True).eval()
    te = CLIPTextModel(clip_config()).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8)).eval()
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                          base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=tr, scheduler=sch, vae=tiny_vae(0.3611, 0.1159), text_encoder=te,
                        tokenizer=clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tokenizer())


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Saved SD3 and FLUX pipelines, variants of them (edited JSON only), and bad inputs."""
    root = tmp_path_factory.mktemp("pipes")
    sd3_pipeline().save_pretrained(root / "sd3")
    flux_pipeline().save_pretrained(root / "flux")
    shutil.copytree(root / "flux", root / "schnell")
    _edit_json(root / "schnell" / "transformer" / "config.json", guidance_embeds=False)
    shutil.copytree(root / "sd3", root / "novae")
    _edit_json(root / "novae" / "model_index.json", vae=[None, None])
    shutil.rmtree(root / "novae" / "vae")
    shutil.copytree(root / "sd3", root / "notext")
    _edit_json(root / "notext" / "model_index.json", text_encoder=[None, None], tokenizer=[None, None])
    (root / "unet").mkdir()
    (root / "unet" / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    (root / "plain").mkdir()
    (root / "empty.txt").write_text("\n# a comment\n   \n")
    (root / "prompts.txt").write_text("a red cube\n\n# skipped\nblue sky\n")
    (root / "afile").write_text("x")
    return root


def _run(argv, capsys):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr()


def _bridge_latents(path, prompts, negative, cfg, solver, steps, size, seed, accel=None, guidance=None):
    bridge = DiffusersBridge.from_pretrained(str(path), guidance=guidance)
    vsf = bridge.pipeline.vae_scale_factor
    noise = torch.randn(len(prompts), bridge.latent_channels, size // vsf, size // vsf,
                        generator=torch.Generator().manual_seed(seed))
    cond = bridge.encode(prompts)
    neg = bridge.encode([negative] * len(prompts)) if cfg != 1.0 else None
    with torch.no_grad():
        return bridge.sample(noise, cond, neg, cfg=cfg, solver=solver, steps=steps, accel=accel), noise, bridge


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cli_latents_equal_the_bridge_and_files_are_written(folders, tmp_path, capsys, family):
    out = tmp_path / "out"
    accel = "fbcache:threshold=0.3"
    cfg = 3.0
    argv = ["sample", "--diffusers", folders / family, "--prompt", "a red cube", "--prompts",
            folders / "prompts.txt", "--negative-prompt", "blur", "--cfg", cfg, "--solver", "heun", "--steps", 3,
            "--seed", 5, "--height", 16, "--width", 16, "--accel", accel, "--precision", "fp32", "--device", "cpu",
            "--no-progress", "--out", out]
    if family == "flux":
        argv += ["--guidance", 2.5]
    rc, cap = _run(argv, capsys)
    assert rc == 0, cap.err
    prompts = ["a red cube", "a red cube", "blue sky"]
    ref, _, _ = _bridge_latents(folders / family, prompts, "blur", cfg, "heun", 3, 16, 5, accel,
                                guidance=2.5 if family == "flux" else None)
    with np.load(out / "latents.npz", allow_pickle=False) as z:
        assert list(z["prompts"]) == prompts and str(z["negative_prompt"]) == "blur"
        torch.testing.assert_close(torch.from_numpy(z["latents"]), ref, rtol=1e-5, atol=1e-6)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["family"] == family and settings["solver"] == "heun" and settings["steps"] == 3
    assert settings["cfg"] == cfg and settings["accel"] == accel and settings["seed"] == 5
    assert settings["guidance"] == (2.5 if family == "flux" else None)
    assert settings["model_calls"] == 6 and settings["accel_full_calls"] <= 6
    assert [im["prompt"] for im in settings["images"]] == prompts
    for k in range(3):
        assert Image.open(out / f"image_{k:03d}.png").size == (16, 16)
    assert Image.open(out / "grid.png").size[0] > 16
    assert "wrote 3 images" in cap.out


def test_cli_images_are_the_pipelines_own_decoding(folders, tmp_path, capsys):
    """With Euler the bridge equals the pipeline, so the CLI's PNGs equal the pipeline's
    output images: the VAE's scaling and shift are undone as the pipelines do."""
    for family in ("sd3", "flux"):
        out = tmp_path / family
        rc, cap = _run(["sample", "--diffusers", folders / family, "--prompt", "a cat", "--solver", "euler",
                        "--steps", 3, "--cfg", 2.0, "--height", 16, "--width", 16, "--precision", "fp32",
                        "--no-progress", "--out", out], capsys)
        assert rc == 0, cap.err
        _, noise, bridge = _bridge_latents(folders / family, ["a cat"], "", 2.0, "euler", 3, 16, 0)
        pipe = bridge.pipeline
        if family == "sd3":
            ref = pipe(prompt="a cat", negative_prompt="", guidance_scale=2.0, num_inference_steps=3, height=16,
                       width=16, latents=noise, output_type="np").images[0]
        else:
            ref = pipe(prompt="a cat", negative_prompt="", true_cfg_scale=2.0, guidance_scale=3.5,
                       num_inference_steps=3, height=16, width=16, latents=pack_flux_latents(noise),
                       output_type="np").images[0]
        ours = np.asarray(Image.open(out / "image_000.png")).astype(np.int16)
        assert np.abs(ours - np.round(ref * 255).astype(np.int16)).max() <= 1


def test_cli_without_a_vae_writes_the_latents_only(folders, tmp_path, capsys):
    out = tmp_path / "o"
    rc, cap = _run(["sample", "--diffusers", folders / "novae", "--prompt", "a cat", "--steps", 2, "--height", 64,
                    "--width", 64, "--no-progress", "--out", out], capsys)
    assert rc == 0, cap.err
    assert sorted(p.name for p in out.iterdir()) == ["latents.npz", "settings.json"]
    assert "latents.npz only (the pipeline has no VAE" in cap.out
    with np.load(out / "latents.npz") as z:
        assert z["latents"].shape == (1, 4, 8, 8)  # the pipelines' VAE factor 8 without a VAE


def test_inspect_pipeline_reads_the_folder_without_loading(folders):
    sd3, flux = inspect_pipeline(str(folders / "sd3")), inspect_pipeline(str(folders / "flux"))
    assert (sd3.family, sd3.vae_scale_factor, sd3.size_multiple, sd3.default_size, sd3.max_size) == \
        ("sd3", 2, 4, 16, 32)
    assert (flux.family, flux.size_multiple, flux.default_size, flux.guidance_embeds) == ("flux", 4, 256, True)
    assert sd3.missing_text == flux.missing_text == ()


D = ["sample", "--diffusers", "{root}/sd3", "--prompt", "a cat", "--height", "16", "--width", "16", "--no-progress"]
F = ["sample", "--diffusers", "{root}/flux", "--prompt", "a cat", "--height", "16", "--width", "16", "--no-progress"]
OUT = ["--out", "{root}/never"]

# (argv, what the one line must name)
REFUSALS = [
    (["sample", "--diffusers", "{root}/missing", "--prompt", "x"] + OUT, "{root}/missing"),
    (["sample", "--diffusers", "{root}/plain", "--prompt", "x"] + OUT, "model_index.json"),
    (["sample", "--diffusers", "{root}/unet", "--prompt", "x"] + OUT, "StableDiffusionPipeline"),
    (["sample", "--diffusers", "{root}/notext", "--prompt", "x"] + OUT, "text_encoder"),
    (["sample", "--prompt", "a cat"] + OUT, "--prompt"),
    # --prompts with --ckpt samples a text-to-image run; a missing run is named.
    (["sample", "--ckpt", "{root}/run", "--prompts", "{root}/prompts.txt"] + OUT, "{root}/run"),
    (["sample", "--ckpt", "{root}/run", "--height", "64"] + OUT, "--height"),
    (["sample"] + OUT, "--ckpt"),
    (D + ["--ckpt", "{root}/run"] + OUT, "--ckpt"),
    (D + ["--num", "4"] + OUT, "--num"),
    (D + ["--classes", "1,2"] + OUT, "--classes"),
    (D + ["--shift", "3"] + OUT, "--shift"),
    (D + ["--no-ema"] + OUT, "--no-ema"),
    (D + ["--tol", "0.1"] + OUT, "--tol"),
    (D + ["--guidance-interval", "0.1,0.9"] + OUT, "--guidance-interval"),
    (D[:5] + ["--height", "18", "--width", "16"] + OUT, "--height 18"),
    (D[:5] + ["--height", "16", "--width", "30"] + OUT, "--width 30"),
    (D[:5] + ["--height", "64", "--width", "16"] + OUT, "--height 64"),  # past pos_embed_max_size
    (F[:5] + ["--height", "18", "--width", "16"] + OUT, "--height 18"),  # FLUX: VAE factor x 2
    (D[:3] + ["--prompts", "{root}/empty.txt"] + OUT, "{root}/empty.txt"),
    (D[:3] + ["--prompts", "{root}/nofile.txt"] + OUT, "{root}/nofile.txt"),
    (D[:3] + OUT, "--prompt"),
    (D + ["--guidance", "3.5"] + OUT, "--guidance"),
    (["sample", "--diffusers", "{root}/schnell", "--prompt", "x", "--guidance", "3"] + OUT, "--guidance"),
    (F + ["--negative-prompt", "blur"] + OUT, "--negative-prompt"),  # FLUX default cfg 1: no CFG
    (D + ["--solver", "dopri5"] + OUT, "--solver"),
    (D + ["--solver", "bogus"] + OUT, "--solver"),
    (D + ["--accel", "ras"] + OUT, "--accel"),
    (D + ["--accel", "bogus"] + OUT, "--accel"),
    (D + ["--out", "{root}/afile"], "--out"),
    (D + ["--steps", "0"] + OUT, "--steps"),
]


@pytest.mark.parametrize("argv,names", REFUSALS, ids=[f"{i:02d}-{c[1]}"[:40] for i, c in enumerate(REFUSALS)])
def test_bad_diffusers_invocations_exit_2_in_one_line_before_any_work(folders, capsys, monkeypatch, argv, names):
    loaded = []
    monkeypatch.setattr(DiffusersBridge, "from_pretrained", classmethod(lambda *a, **k: loaded.append(1)))
    fill = {"root": str(folders)}
    rc, cap = _run([a.format(**fill) for a in argv], capsys)
    lines = cap.err.strip().splitlines()
    assert rc == 2, cap
    assert len(lines) == 1 and lines[0].startswith("flowdit: error:"), lines
    assert names.format(**fill) in lines[0], lines[0]
    assert "Traceback" not in cap.err
    assert loaded == [] and not (folders / "never").exists()


def test_missing_extra_is_one_line_naming_it(folders, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers raises ImportError
    argv = [a.format(root=folders) for a in D] + ["--out", str(folders / "never")]
    rc, cap = _run(argv, capsys)
    lines = cap.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1
    assert 'pip install "flowdit[diffusers]"' in lines[0]
    assert not (folders / "never").exists()
