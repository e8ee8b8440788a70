"""Inversion and editing: closed-form round trips, NFE, RF-Edit feature sharing,
RF-Inversion's controlled ODEs and time convention, FlowChef, operators, CLI."""

import numpy as np
import pytest
import torch

from flowdit.cli import main
from flowdit.edit import (
    ClassifierGuidanceSolver,
    FlowChefSolver,
    GaussianBlur,
    Inpaint,
    SuperResolution,
    default_edit_blocks,
    edit_blocks,
    TASKS,
    build_operator,
    classifier_guided_sample,
    controlled_forward_field,
    controlled_reverse_field,
    value_sharing,
    invert,
    invert_images,
    inversion_grid,
    measure,
    model_velocity,
    paper_forward_field,
    paper_reverse_field,
    regenerate,
    regenerate_images,
    restore,
    rf_edit,
    rf_inversion,
    sampling_grid,
)
from flowdit.errors import ConfigError
from flowdit.models.attention import SDPAProcessor, merge_heads, qkv_heads
from flowdit.sampling import sample
from flowdit.sampling.context import StepContext

# Gaussian-to-Gaussian flow (see tests/test_sampling.py): exact marginal velocity, and the
# exact inversion x0 -> (x0 - mu) / sigma.
D = 6
MU = torch.linspace(-1.0, 1.0, D, dtype=torch.float64)
SIGMA = torch.linspace(0.3, 1.5, D, dtype=torch.float64)


def gaussian_velocity(x, t):
    t = t.reshape(-1, 1)
    s2 = (1 - t) ** 2 * SIGMA**2 + t**2
    return (t - (1 - t) * SIGMA**2) / s2 * (x - (1 - t) * MU) - MU


def data(n, seed):
    return MU + SIGMA * torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def fitted_order(errors, steps):
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


# ------------------------------------------------------------------ inversion


@pytest.mark.parametrize("solver,min_order", [("euler", 0.9), ("rf2", 1.9), ("fireflow", 1.8)])
def test_round_trip_error_falls_at_solver_order(solver, min_order):
    x0 = data(8, seed=1)
    steps = [8, 16, 32, 64]
    noise_err, recon_err = [], []
    for n in steps:
        z = invert(gaussian_velocity, x0, solver, n).x
        noise_err.append((z - (x0 - MU) / SIGMA).abs().max().item())
        recon_err.append((regenerate(gaussian_velocity, z, solver, n).x - x0).abs().max().item())
    assert fitted_order(noise_err, steps) > min_order, noise_err
    assert fitted_order(recon_err, steps) > min_order, recon_err
    if solver != "euler":
        assert recon_err[-1] < 1e-4


@pytest.mark.parametrize("solver,nfe", [("euler", lambda n: n), ("rf2", lambda n: 2 * n),
                                        ("fireflow", lambda n: n + 1)])
def test_nfe_counts_are_what_the_solvers_claim(solver, nfe):
    x0 = data(2, seed=0)
    for n in (1, 5, 12):
        assert invert(gaussian_velocity, x0, solver, n).nfe == nfe(n)
        assert regenerate(gaussian_velocity, x0, solver, n).nfe == nfe(n)


def test_fireflow_reuses_the_previous_midpoint_velocity():
    calls = []

    def v(x, t):
        calls.append(float(t[0]))
        return gaussian_velocity(x, t)

    regenerate(v, data(1, 0), "fireflow", 4)
    # 1, then the midpoints of the four steps: the start of steps 2..4 is never evaluated.
    assert calls == pytest.approx([1.0, 0.875, 0.625, 0.375, 0.125])


def test_inversion_grid_mirrors_sampling_grid():
    torch.testing.assert_close(inversion_grid(7, 3.0), sampling_grid(7, 3.0).flip(0))
    with pytest.raises(ConfigError):
        sampling_grid(0)


# ------------------------------------------------------------- model fixtures


# -------------------------------------------------------------------- RF-Edit


def test_rf_edit_with_no_injection_is_plain_regeneration(tiny, batch):
    x, ys, yt = batch
    res = rf_edit(tiny, x, ys, yt, inject_steps=0, solver="rf2", steps=4)
    z, nfe = invert_images(tiny, x, ys, "rf2", 4)
    plain, _ = regenerate_images(tiny, z, yt, "rf2", 4)
    torch.testing.assert_close(res.noise, z, rtol=0, atol=0)
    torch.testing.assert_close(res.images, plain, rtol=0, atol=0)
    assert res.nfe_invert == nfe == 8
    assert all(isinstance(a.processor, SDPAProcessor) for a in tiny.attention_modules())


def test_rf_edit_injects_the_recorded_values_in_the_chosen_blocks_only(tiny, batch):
    # The reference (wangjiangshan0725/RF-Solver-Edit, FLUX_Image_Edit/src/flux/sampling.py,
    # denoise; modules/layers.py, SingleStreamBlock.forward) keys a value tensor by the
    # step's upper time, first / second (midpoint) evaluation and block; inversion records
    # in its last k steps, regeneration replaces V in its first k. Restated here: the j-th
    # regeneration step's e-th evaluation reads the V of inversion step N-1-j, evaluation e.
    x, ys, yt = batch
    steps, k = 4, 2
    chosen = edit_blocks(tiny)
    assert chosen == [1]  # the second half of DiT-tiny's two blocks
    calls = {b: [] for b in range(len(tiny.attention_modules()))}

    def hook(b):
        return lambda mod, args, out: calls[b].append((args[0].detach().clone(), out.detach().clone()))

    handles = [a.register_forward_hook(hook(b)) for b, a in enumerate(tiny.attention_modules())]
    try:
        rf_edit(tiny, x, ys, yt, inject_steps=k, solver="rf2", steps=steps)
    finally:
        for h in handles:
            h.remove()
    n_inv = 2 * steps  # rf2: two evaluations per step, one attention call per block each
    injected = 0
    for b, seq in calls.items():
        attn = tiny.attention_modules()[b]
        assert len(seq) == 2 * n_inv
        for c, (inp, out) in enumerate(seq):
            q, kk, v = qkv_heads(attn, inp)
            if b in chosen and c >= n_inv and (c - n_inv) // 2 < k:
                j, e = divmod(c - n_inv, 2)
                src_inp = seq[2 * (steps - 1 - j) + e][0]
                v_src = qkv_heads(attn, src_inp)[2]
                assert (v_src - v).abs().max() > 1e-3  # the source's V is not the edit's own
                v = v_src
                injected += 1
            expected = attn.proj(merge_heads(torch.nn.functional.scaled_dot_product_attention(q, kk, v)))
            torch.testing.assert_close(out, expected, msg=f"block {b}, call {c}")
    assert injected == 2 * k


def test_rf_edit_block_option(tiny):
    assert default_edit_blocks(2) == [1] and default_edit_blocks(57) == list(range(28, 57))
    assert edit_blocks(tiny, range(2)) == [0, 1] and edit_blocks(tiny, [1, 0, 1]) == [0, 1]
    assert value_sharing(tiny, blocks=[0]).blocks == [0]
    assert value_sharing(tiny).blocks == [1]
    with pytest.raises(ConfigError, match="empty"):
        edit_blocks(tiny, [])

    class ReferenceStructured(torch.nn.Module):
        # A model with the reference's structure names its block set itself.
        def attention_modules(self):
            return tiny.attention_modules()

        def rf_edit_blocks(self):
            return [0]

    assert edit_blocks(ReferenceStructured()) == [0]


@pytest.mark.parametrize("solver", ["rf2", "fireflow", "euler"])
def test_reinjecting_features_of_the_same_pass_changes_nothing(tiny, batch, solver):
    x, _, yt = batch
    grid = sampling_grid(4)
    sharing = value_sharing(tiny, blocks=[0, 1])
    ctx = StepContext(hooks=[sharing])
    fn = model_velocity(tiny, yt, ctx=ctx)
    sharing.plan = lambda i: "record"
    rec = sample(fn, x, solver, schedule=grid, step_context=ctx).x
    assert len(sharing.store) > 0
    sharing.plan = lambda i: "inject"
    inj = sample(fn, x, solver, schedule=grid, step_context=ctx).x
    torch.testing.assert_close(inj, rec, rtol=0, atol=0)


def test_rf_edit_bad_input(tiny, batch):
    x, ys, yt = batch
    with pytest.raises(ConfigError, match="inject_steps"):
        rf_edit(tiny, x, ys, yt, inject_steps=5, steps=4)
    with pytest.raises(ConfigError, match="blocks"):
        rf_edit(tiny, x, ys, yt, inject_steps=1, steps=4, blocks=[7])
    with pytest.raises(ConfigError, match="target"):
        rf_edit(tiny, x, ys, yt[:2], steps=4)
    assert all(isinstance(a.processor, SDPAProcessor) for a in tiny.attention_modules())


# --------------------------------------------------------------- RF-Inversion


def test_rf_inversion_gamma_zero_is_plain_inversion():
    x0 = data(4, seed=5)
    y1 = torch.randn_like(x0)
    ctrl = sample(controlled_forward_field(gaussian_velocity, y1, 0.0), x0, "euler", schedule=inversion_grid(6)).x
    torch.testing.assert_close(ctrl, invert(gaussian_velocity, x0, "euler", 6).x, rtol=0, atol=0)
    back = sample(controlled_reverse_field(gaussian_velocity, x0, 0.0), ctrl, "euler", schedule=sampling_grid(6)).x
    torch.testing.assert_close(back, regenerate(gaussian_velocity, ctrl, "euler", 6).x, rtol=0, atol=0)


def test_rf_inversion_gamma_zero_on_a_model(tiny, batch):
    x, ys, yt = batch
    res = rf_inversion(tiny, x, ys, yt, gamma=0.0, eta=0.0, solver="rf2", steps=4)
    z, _ = invert_images(tiny, x, ys, "rf2", 4)
    torch.testing.assert_close(res.noise, z, rtol=0, atol=0)
    torch.testing.assert_close(res.images, regenerate_images(tiny, z, yt, "rf2", 4)[0], rtol=0, atol=0)


def _euler(field, x, grid):
    for a, b in zip(grid[:-1].tolist(), grid[1:].tolist()):
        x = x + (b - a) * field(x, torch.full((x.shape[0],), a, dtype=x.dtype))
    return x


def test_rf_inversion_matches_the_paper_in_its_own_time():
    # The paper's generative velocity runs from noise (tau = 0) to data (tau = 1).
    def v_paper(x, tau):
        return -gaussian_velocity(x, 1 - tau)

    x0, y1 = data(4, seed=6), torch.randn(4, D, dtype=torch.float64)
    s = torch.linspace(0, 1, 9, dtype=torch.float64)
    for gamma in (0.0, 0.4, 1.0):
        paper = _euler(paper_forward_field(v_paper, y1, gamma), x0, s)  # paper s = flowdit t here
        ours = sample(controlled_forward_field(gaussian_velocity, y1, gamma), x0, "euler", schedule=s).x
        torch.testing.assert_close(ours, paper)
    for eta in (0.0, 0.5, 1.0):
        paper = _euler(paper_reverse_field(v_paper, x0, eta), y1, s)  # paper s = 1 - flowdit t
        ours = sample(controlled_reverse_field(gaussian_velocity, x0, eta), y1, "euler", schedule=s.flip(0)).x
        torch.testing.assert_close(ours, paper)


def test_full_controllers_reach_their_targets():
    x0, y1 = data(3, seed=7), torch.randn(3, D, dtype=torch.float64)
    z = sample(controlled_forward_field(gaussian_velocity, y1, 1.0), x0, "euler", schedule=inversion_grid(5)).x
    torch.testing.assert_close(z, y1)
    back = sample(controlled_reverse_field(gaussian_velocity, x0, 1.0), y1, "euler", schedule=sampling_grid(5)).x
    torch.testing.assert_close(back, x0)
    with pytest.raises(ConfigError, match="singular"):
        sample(controlled_forward_field(gaussian_velocity, y1, 0.5), x0, "heun", schedule=inversion_grid(2))
    with pytest.raises(ConfigError, match="gamma"):
        controlled_forward_field(gaussian_velocity, y1, 1.5)


# -------------------------------------------------------------------- FlowChef


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise AssertionError("a backward pass went through the model")


class GuardedModel(torch.nn.Module):
    """A velocity model that fails if asked to build or run a graph."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7))
        self.calls = 0

    def forward(self, x, t, y=None, ctx=None):
        self.calls += 1
        assert not torch.is_grad_enabled(), "model evaluated with autograd on"
        assert not x.requires_grad
        return _NoBackward.apply(self.w * x + t.reshape(-1, 1, 1, 1))


def _img(n=2, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_flowchef_never_builds_a_graph_through_the_model():
    model = GuardedModel()
    op = build_operator("sr2", (1, 8, 8))
    x = _img()
    fn = lambda xx, tt: model(xx, tt)  # noqa: E731
    out = restore(fn, torch.randn(2, 1, 8, 8), op, op(x), "flowchef", steps=5)
    assert out.nfe == model.calls == 5 and not out.x.requires_grad
    guide = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    model.calls = 0
    res = classifier_guided_sample(fn, torch.randn(2, 1, 8, 8), guide, torch.tensor([1, 2]), scale=0.5, steps=4)
    assert res.nfe == model.calls == 4 and not res.x.requires_grad


@pytest.mark.parametrize("task", ["inpaint", "inpaint_random", "sr2", "sr4"])
def test_flowchef_unit_step_lands_on_the_measurements(task):
    op = build_operator(task, (1, 8, 8), batch=2, seed=1)
    x = _img()
    y = op(x)
    v = lambda xx, tt: 0.3 * xx  # noqa: E731
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    # flowdit's variant steers the last step too: the output itself is projected onto A x = y.
    out = restore(v, noise, op, y, "flowchef", 6, guide_last_step=True).x
    torch.testing.assert_close(op(out), y)
    # The reference's last step is plain Euler: steered steps down to t = 1/6, then x - t v.
    ref = restore(v, noise, op, y, "flowchef", 6).x
    grid = sampling_grid(6)
    before = sample(v, noise, FlowChefSolver(op, y), schedule=grid[:-1]).x
    torch.testing.assert_close(ref, before - float(grid[-2]) * v(before, None))
    assert (op(ref) - y).abs().max() > 1e-4
    base = restore(v, torch.randn(2, 1, 8, 8), op, y, "baseline", 6).x
    torch.testing.assert_close(op(base), y)
    free = restore(v, torch.randn(2, 1, 8, 8), op, y, "unguided", 6).x
    assert (op(free) - y).abs().max() > 1e-2


def _flowchef_reference(model_fn, z, grid, A, y, mask, gradient_scale):
    # FlowChef/FlowChef, inverseproblems/pixel_models/rfpp/generate_inverseproblems_flowchef.py,
    # sample_ode_generative (Euler branch, not `likebaseline`), restated line by line.
    N = len(grid) - 1
    for i in range(N):
        t, dt = float(grid[i]), float(grid[i + 1] - grid[i])
        with torch.no_grad():
            vt = model_fn(z, torch.full((z.shape[0],), t))
        if i < N - 1:
            with torch.enable_grad():
                z = z.detach().requires_grad_()
                z_h = z - t * vt
                loss = torch.mean(torch.nn.functional.mse_loss(A(z_h), y, reduction="none") * mask)
                grads = torch.autograd.grad(loss, z)[0]
                z = z.detach() - gradient_scale * grads
        z = z.detach().clone() + vt * dt
    return z


@pytest.mark.parametrize("task", ["inpaint_random", "sr2", "deblur"])
def test_flowchef_matches_the_reference_loop(tiny, batch, task):
    x, ys, _ = batch
    op = build_operator(task, (1, 8, 8), batch=3, seed=2)
    y = op(x)
    # The reference multiplies the squared residual by its operator's mask (ones for SR / blur).
    mask = op.mask.expand_as(y) if isinstance(op, Inpaint) else torch.ones_like(y)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    fn = model_velocity(tiny, ys)
    grid = sampling_grid(5)
    gs = 40.0
    ref = _flowchef_reference(fn, noise, grid, op.forward, y, mask, gs)
    with torch.no_grad():
        ours = sample(fn, noise, FlowChefSolver.from_gradient_scale(op, y, gs), schedule=grid).x
        # The same update through restore(), with step_size = 2 gradient_scale ||A||^2 / numel(y).
        via = restore(fn, noise, op, y, "flowchef", 5, step_size=2 * gs * op.norm_sq / y.numel()).x
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via, ours, rtol=1e-6, atol=1e-6)
    # Steering the last step (flowdit's variant) changes the output: the option is not a no-op.
    with torch.no_grad():
        last = sample(fn, noise, FlowChefSolver.from_gradient_scale(op, y, gs, guide_last_step=True),
                      schedule=grid).x
    assert (last - ref).abs().max() > 1e-3


def test_flowchef_and_baseline_bad_input():
    with pytest.raises(ConfigError, match="pseudo-inverse"):
        restore(lambda x, t: x, torch.randn(1, 1, 8, 8), build_operator("deblur", (1, 8, 8)), torch.zeros(1, 1, 8, 8),
                "baseline", 2)
    with pytest.raises(ConfigError, match="method"):
        restore(lambda x, t: x, torch.randn(1, 1, 8, 8), build_operator("sr2", (1, 8, 8)), torch.zeros(1, 1, 4, 4),
                "magic", 2)
    from flowdit.eval.networks import EvaluatorNet

    with pytest.raises(ConfigError, match="evaluator"):
        ClassifierGuidanceSolver(EvaluatorNet(1, 8, 4), torch.tensor([0]))


# ------------------------------------------------------------------- operators


@pytest.mark.parametrize("task", TASKS)
def test_operator_adjoint_and_shapes(task):
    shape = (1, 8, 8)
    op = build_operator(task, shape, batch=3, seed=4)
    x = torch.randn(3, *shape, dtype=torch.float64)
    Ax = op(x)
    expected = {"sr2": (3, 1, 4, 4), "sr4": (3, 1, 2, 2)}.get(task, (3, 1, 8, 8))
    assert tuple(Ax.shape) == expected
    y = torch.randn_like(Ax)
    torch.testing.assert_close((Ax * y).sum(), (x * op.adjoint(y)).sum())
    # The data-fidelity gradient equals autograd's, through the operator alone.
    xg = x.clone().requires_grad_(True)
    (0.5 * (op(xg) - y).pow(2).sum()).backward()
    torch.testing.assert_close(op.residual_grad(x, y), xg.grad)
    if op.pinv is not None:
        torch.testing.assert_close(op(op.pinv(Ax)), Ax)
    # ||A||^2 bounds the Rayleigh quotient of A^T A.
    assert (op(x).pow(2).sum() / x.pow(2).sum()).item() <= op.norm_sq + 1e-9


def test_operator_bad_input_and_noise():
    with pytest.raises(ConfigError, match="unknown restoration task"):
        build_operator("colorize", (1, 8, 8))
    with pytest.raises(ConfigError, match="divisible"):
        build_operator("sr4", (1, 6, 6))
    with pytest.raises(ConfigError, match="odd"):
        GaussianBlur(4)
    with pytest.raises(ConfigError, match=r"\[B, C, H, W\]"):
        SuperResolution(2)(torch.zeros(8, 8))
    op = Inpaint(build_operator("inpaint", (1, 8, 8)).mask)
    x = _img(1)
    y = measure(op, x, 0.1, seed=0)
    assert (y[op.mask.expand_as(y) == 0] == 0).all() and (y - op(x)).abs().max() > 0
    with pytest.raises(ConfigError, match="noise"):
        measure(op, x, -1.0)


# ------------------------------------------------------------------------- CLI

TINY = ["data.dataset=digits", "model.name=DiT-tiny", "train.batch_size=16", "train.precision=fp32",
        "optim.warmup_steps=1", "train.steps=2", "train.ckpt_every=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit_run")
    assert main(["train", "--no-progress", "--no-outputs", *TINY, f"out_dir={root}", "name=r"]) == 0
    from flowdit.data import build_dataset
    from flowdit.utils.images import save_grid_png, save_npz

    ds = build_dataset("digits", split="test")
    x, y = ds.batch(torch.arange(4))
    save_npz(root / "in.npz", x, y)
    save_grid_png(x[:1], root / "one.png", nrow=1, upscale=1)
    return root


def _common(run_dir):
    return ["--ckpt", str(run_dir / "r"), "--precision", "fp32", "--steps", "2"]


def test_cli_invert_writes_latents_and_reconstruction(run_dir):
    out, rec = run_dir / "z.npz", run_dir / "rec.png"
    assert main(["invert", *_common(run_dir), "--input", str(run_dir / "in.npz"), "--out", str(out),
                 "--recon", str(rec), "--solver", "fireflow"]) == 0
    z = np.load(out)
    assert z["noise"].shape == (4, 1, 8, 8) and z["labels"].shape == (4,) and str(z["solver"]) == "fireflow"
    assert rec.is_file()
    st = run_dir / "z.safetensors"
    assert main(["invert", *_common(run_dir), "--input", str(run_dir / "one.png"), "--out", str(st)]) == 0
    from safetensors.torch import load_file

    assert tuple(load_file(str(st))["noise"].shape) == (1, 1, 8, 8)


def test_cli_edit_and_restore_write_what_they_promise(run_dir):
    from flowdit.utils.images import load_npz

    out = run_dir / "e.npz"
    assert main(["edit", *_common(run_dir), "--input", str(run_dir / "in.npz"), "--target", "3",
                 "--inject", "1", "--out", str(out)]) == 0
    imgs, labels = load_npz(out)
    assert imgs.shape == (4, 1, 8, 8) and labels.tolist() == [3, 3, 3, 3]
    assert main(["edit", *_common(run_dir), "--method", "rf-inversion", "--input", str(run_dir / "in.npz"),
                 "--target", "1", "--eta-steps", "0,1", "--out", str(run_dir / "e.png")]) == 0
    for task in ("inpaint", "sr2"):
        out = run_dir / f"r_{task}.npz"
        assert main(["restore", *_common(run_dir), "--task", task, "--input", str(run_dir / "in.npz"),
                     "--out", str(out), "--degraded", str(run_dir / f"d_{task}.png")]) == 0
        assert load_npz(out)[0].shape == (4, 1, 8, 8) and (run_dir / f"d_{task}.png").is_file()


def test_cli_bad_input_is_one_line(run_dir, capsys):
    cases = [
        ["invert", *_common(run_dir), "--input", str(run_dir / "missing.npz"), "--out", str(run_dir / "z.npz")],
        ["invert", *_common(run_dir), "--input", str(run_dir / "in.npz"), "--out", str(run_dir / "z.pt")],
        ["edit", *_common(run_dir), "--input", str(run_dir / "in.npz"), "--target", "1,2", "--out", str(run_dir / "e.png")],
        ["restore", *_common(run_dir), "--task", "deblur", "--method", "baseline", "--input", str(run_dir / "in.npz"),
         "--out", str(run_dir / "r.png")],
        ["restore", *_common(run_dir), "--task", "sr4", "--input", str(run_dir / "in.npz"), "--out",
         str(run_dir / "r.png"), "--noise-std", "-1"],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flowdit: error:"), err
