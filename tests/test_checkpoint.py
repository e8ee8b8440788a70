"""Checkpoints: bit-exact round trips, atomic layout, and loud failures on damage."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from flowdit.errors import CheckpointError
from flowdit.train.checkpoint import (
    checkpoint_candidates,
    latest_checkpoint,
    load_checkpoint,
    load_state_dict_strict,
    move_aside,
    nonfinite_tensors,
    save_checkpoint,
    tensors_checksum,
    verify_checkpoint,
)


class NotAllowed:
    """A custom class: weights_only loading must never instantiate it."""


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def train_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 3, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def save_simple(run_dir, step, keep_last=3, value=None):
    sd = {"w": torch.full((3, 2), float(step if value is None else value)), "b": torch.arange(5)}
    return save_checkpoint(run_dir, step, {"model": sd}, {"step": step}, {"note": "x"}, keep_last)


def test_round_trip_bit_exact_and_optimizer_resume(tmp_path):
    model = tiny_model()
    ema = {k: v.detach().clone() * 0.5 for k, v in model.state_dict().items()}
    ema["half"] = torch.randn(3, 5).to(torch.bfloat16)
    ema["strided"] = torch.randn(6, 4).t()  # non-contiguous input
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for s in range(3):
        train_step(model, opt, s)
    rng = torch.get_rng_state()
    meta = {"config": {"model": {"depth": 2}, "lr": 1e-2}, "tags": ["a", "b"]}
    state = {"optimizer": opt.state_dict(), "step": 3, "rng": {"torch": rng}, "pystate": (1, "x", None)}
    path = save_checkpoint(tmp_path, 3, {"model": model.state_dict(), "ema": ema}, state, meta)

    assert path == tmp_path / "checkpoints" / "step_0000003"
    assert sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors", "manifest.json", "model.safetensors", "trainer_state.pt"
    ]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["meta"] == meta
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    ck = load_checkpoint(path)
    assert ck.step == 3 and ck.meta == meta and ck.path == path
    for group, ref in (("model", model.state_dict()), ("ema", ema)):
        assert ck.tensors[group].keys() == ref.keys()
        for k, v in ref.items():
            assert ck.tensors[group][k].dtype == v.dtype
            assert torch.equal(ck.tensors[group][k], v)
    assert torch.equal(ck.trainer_state["rng"]["torch"], rng)
    assert ck.trainer_state["pystate"] == (1, "x", None)

    # Continue the original run one step, and a fresh run resumed from the checkpoint.
    fresh = tiny_model(seed=123)
    load_state_dict_strict(fresh, ck.tensors["model"])
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    fresh_opt.load_state_dict(ck.trainer_state["optimizer"])
    train_step(model, opt, 99)
    train_step(fresh, fresh_opt, 99)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_latest_resolution_from_run_dir(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_checkpoint(tmp_path)
    save_simple(tmp_path, 10)
    p20 = save_simple(tmp_path, 20)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000020"
    assert latest_checkpoint(tmp_path) == p20
    assert latest_checkpoint(tmp_path / "checkpoints") == p20
    for where in (tmp_path, tmp_path / "checkpoints", p20):
        ck = load_checkpoint(where, load_tensors_only=True)
        assert ck.step == 20 and ck.trainer_state is None
        assert torch.equal(ck.tensors["model"]["w"], torch.full((3, 2), 20.0))


def test_resave_same_step_replaces_it(tmp_path):
    save_simple(tmp_path, 5, value=1.0)
    p = save_simple(tmp_path, 5, value=2.0)
    assert torch.equal(load_checkpoint(tmp_path).tensors["model"]["w"], torch.full((3, 2), 2.0))
    assert sorted(x.name for x in p.parent.iterdir()) == ["latest", "step_0000005"]


def test_keep_last_pruning(tmp_path):
    for step in (1, 2, 3, 4, 5):
        save_simple(tmp_path, step, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000004", "step_0000005"]
    # Resuming from an older step: the one just written survives even though it is lowest.
    save_simple(tmp_path, 3, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == [
        "latest", "step_0000003", "step_0000004", "step_0000005"
    ]
    assert latest_checkpoint(tmp_path).name == "step_0000003"


def test_truncated_safetensors(tmp_path):
    path = save_simple(tmp_path, 1)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: size \d+ != \d+ in manifest.json \(truncated\?\)"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(path, verify=False)


def test_flipped_byte_fails_checksum(tmp_path):
    path = save_simple(tmp_path, 1)
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: SHA-256 checksum mismatch"):
        load_checkpoint(path)
    # Without verification the size still matches and the damage goes unnoticed.
    assert load_checkpoint(path, verify=False).step == 1


def test_corrupt_safetensors_header_with_matching_manifest(tmp_path):
    path = save_simple(tmp_path, 1)
    f = path / "model.safetensors"
    f.write_bytes(b"\xff" * f.stat().st_size)
    _rewrite_manifest_entry(path, "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable safetensors file"):
        load_checkpoint(path)


def test_deleted_file(tmp_path):
    path = save_simple(tmp_path, 1)
    (path / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt: missing"):
        load_checkpoint(path)


def test_bad_manifest(tmp_path):
    path = save_simple(tmp_path, 1)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"manifest\.json: unreadable manifest"):
        load_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json: missing"):
        load_checkpoint(path)


def test_stale_temp_dir_and_dangling_latest(tmp_path):
    p1 = save_simple(tmp_path, 100)
    root = tmp_path / "checkpoints"
    # A crash mid-save leaves a hidden temp dir with partial files and no manifest...
    stale = root / ".tmp-step_0000200-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    # ...and a half-copied step directory made by hand has no manifest either.
    (root / "step_0000300").mkdir()
    assert latest_checkpoint(tmp_path) == p1
    assert load_checkpoint(tmp_path).step == 100

    # `latest` pointing at a missing directory falls back to the highest complete step.
    p2 = save_simple(tmp_path, 150, keep_last=None)
    assert not stale.exists()  # the next successful save clears crash leftovers
    (root / "latest").write_text("step_0000999\n")
    assert latest_checkpoint(tmp_path) == p2
    with pytest.raises(CheckpointError, match="manifest.json: missing"):
        load_checkpoint(root / "step_0000300")


def test_trainer_state_refuses_custom_objects_at_save(tmp_path):
    with pytest.raises(CheckpointError, match=r"trainer_state\['extra'\]\[0\]: .*NotAllowed is not allowed"):
        save_checkpoint(tmp_path, 1, {"model": {}}, {"extra": [NotAllowed()]}, {})
    assert latest_checkpoint(tmp_path) is None
    assert not (tmp_path / "checkpoints").exists()  # refused before anything is written


def test_trainer_state_loaded_with_weights_only(tmp_path, monkeypatch):
    path = save_simple(tmp_path, 1)
    # Smuggle a pickled custom object past save_checkpoint, with a consistent manifest.
    torch.save({"step": 1, "evil": NotAllowed()}, path / "trainer_state.pt")
    _rewrite_manifest_entry(path, "trainer_state.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    # Said in flowdit's words: refused because it carries code, never torch's advice to
    # load it with weights_only=False.
    assert msg.endswith("trainer_state.pt: this file contains code (a reference to test_checkpoint.NotAllowed), "
                        "refused; a flowdit trainer state holds only tensors and plain values")
    assert "weights_only" not in msg and "\n" not in msg
    assert load_checkpoint(path, load_tensors_only=True).step == 1

    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_checkpoint(save_simple(tmp_path, 2))
    assert seen == [True]


def test_bad_inputs(tmp_path):
    with pytest.raises(CheckpointError, match="meta is not JSON-serialisable"):
        save_checkpoint(tmp_path, 1, {"model": {}}, {}, {"t": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="bad tensor group name '../x'"):
        save_checkpoint(tmp_path, 1, {"../x": {}}, {}, {})
    with pytest.raises(CheckpointError, match=r"tensors\['model'\]\['w'\]: expected a tensor"):
        save_checkpoint(tmp_path, 1, {"model": {"w": 1.0}}, {}, {})
    with pytest.raises(CheckpointError, match="step must be a non-negative int"):
        save_checkpoint(tmp_path, -1, {"model": {}}, {}, {})
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing")


def test_load_state_dict_strict_messages():
    model = tiny_model()
    sd = dict(model.state_dict())
    sd.pop("0.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["2.weight"] = torch.zeros(5, 8)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_strict(model, sd, what="ema")
    msg = str(e.value)
    assert msg.startswith("ema: state dict does not match")
    assert "1 missing keys: 0.bias" in msg
    assert "1 unexpected keys: extra.weight" in msg
    assert "2.weight [5, 8] in checkpoint vs [3, 8] in ema" in msg
    assert "\n" not in msg

    many = {f"k{i}": torch.zeros(1) for i in range(9)}
    with pytest.raises(CheckpointError, match=r"9 unexpected keys: k0, k1, k2, k3, k4, \.\.\. \(\+4 more\)"):
        load_state_dict_strict(torch.nn.Identity(), many)


def _rewrite_manifest_entry(path, name):
    manifest = json.loads((path / "manifest.json").read_text())
    data = (path / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_tensors_checksum_is_the_files_sha256_and_follows_the_weights(tmp_path):
    """The checksum read from the manifest is the SHA-256 of the tensor file on disk, the
    run directory resolves to its latest checkpoint, and other weights give another value."""
    first = save_simple(tmp_path, 1, value=1.0)
    digest = hashlib.sha256((first / "model.safetensors").read_bytes()).hexdigest()
    assert tensors_checksum(first, "model") == digest
    assert tensors_checksum(tmp_path, "model") == digest
    save_simple(tmp_path, 2, value=2.0)
    assert tensors_checksum(tmp_path, "model") != digest
    with pytest.raises(CheckpointError, match="no ema.safetensors listed"):
        tensors_checksum(first)


def test_manifest_with_an_unknown_key_or_another_version_is_refused(tmp_path):
    path = save_simple(tmp_path, 1)
    good = (path / "manifest.json").read_text()
    for change, message in ((dict(extra=1), "unknown manifest key 'extra'"),
                            (dict(format_version=0), "format version 0 is not the one this flowdit reads (1)"),
                            (dict(format_version=2), "format version 2 is newer than the one this flowdit reads"),
                            (dict(format_version=True), "format version True is not the one")):
        (path / "manifest.json").write_text(json.dumps(dict(json.loads(good), **change)))
        with pytest.raises(CheckpointError, match=re.escape(message)):
            load_checkpoint(path)
    (path / "manifest.json").write_text(good)
    assert verify_checkpoint(path)["step"] == 1


def test_non_finite_weights_are_never_saved(tmp_path):
    for bad in (float("nan"), float("inf")):
        with pytest.raises(CheckpointError, match=r"step 3: refusing to save non-finite weights \(1 tensors hold "
                                                  r"NaN or inf, first ema/b\)"):
            save_checkpoint(tmp_path, 3, {"model": {"a": torch.ones(2)}, "ema": {"b": torch.tensor([1.0, bad])}})
    assert not (tmp_path / "checkpoints" / "step_0000003").exists()
    assert nonfinite_tensors({"g": {"i": torch.arange(3), "f": torch.zeros(2)}}) == []


def test_move_aside_keeps_a_damaged_checkpoint_out_of_every_scan(tmp_path):
    save_simple(tmp_path, 1)
    p2 = save_simple(tmp_path, 2)
    kept = move_aside(p2)
    assert kept.name == "corrupt-step_0000002" and (kept / "manifest.json").is_file()
    assert latest_checkpoint(tmp_path).name == "step_0000001"
    assert [p.name for p in checkpoint_candidates(tmp_path)] == ["step_0000001"]
    save_simple(tmp_path, 3)  # pruning (keep 3) and crash clean-up leave it alone
    assert kept.is_dir()
