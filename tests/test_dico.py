"""DiCo (shallowdream204/DiCo, dico_models.py): the block and the whole forward restated
from the reference on the same weights, the reference initialisation, shapes and refusals."""

import pytest
import torch
import torch.nn.functional as F

from flowdit.errors import ConfigError
from flowdit.models.dico import DiCo, DiCoConfig


def ref_layernorm2d(x):
    # LayerNorm2d(affine=False, eps=1e-6): permute to channels-last, layer_norm, permute back.
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=1e-6).permute(0, 3, 1, 2)


def ref_modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(-1).unsqueeze(-1)) + shift.unsqueeze(-1).unsqueeze(-1)


def ref_block(b, inp, c):
    """dico_models.py DiCoBlock.forward, restated on flowdit's module's weights."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = b.adaLN_modulation(c).chunk(6, dim=1)
    x = ref_modulate(ref_layernorm2d(inp), shift_msa, scale_msa)
    x = F.gelu(b.conv2(b.conv1(x)))
    x = x * torch.sigmoid(b.ca(F.adaptive_avg_pool2d(x, 1)))  # ca = AdaptiveAvgPool2d(1), Conv2d 1x1, Sigmoid
    x = b.conv3(x)
    x = inp + gate_msa.unsqueeze(-1).unsqueeze(-1) * x
    return x + gate_mlp.unsqueeze(-1).unsqueeze(-1) * b.conv5(F.gelu(b.conv4(ref_modulate(ref_layernorm2d(x), shift_mlp, scale_mlp))))


def ref_forward(m, x, t, y):
    """dico_models.py DiCo.forward (without learned sigma), restated."""
    c1, c2, c3 = (te(t) + ye(y) for te, ye in zip(m.t_embedders, m.y_embedders))
    e1 = m.x_embedder(x)
    for b in m.encoder1.blocks:
        e1 = ref_block(b, e1, c1)
    e2 = m.down1(e1)
    for b in m.encoder2.blocks:
        e2 = ref_block(b, e2, c2)
    lat = m.down2(e2)
    for b in m.middle.blocks:
        lat = ref_block(b, lat, c3)
    d2 = m.reduce2(torch.cat([m.up2(lat), e2], 1))
    for b in m.decoder2.blocks:
        d2 = ref_block(b, d2, c2)
    d1 = m.reduce1(torch.cat([m.up1(d2), e1], 1))
    for b in m.decoder1.blocks:
        d1 = ref_block(b, d1, c2)
    shift, scale = m.final_adaLN(c2).chunk(2, dim=1)
    return m.final_conv(ref_modulate(ref_layernorm2d(d1), shift, scale))


def small(**kw):
    return DiCo(DiCoConfig(**{"input_size": 8, "in_channels": 1, "num_classes": 10, "hidden_size": 8,
                              "depth": (1, 1, 2, 1, 1), **kw}))


def test_forward_equals_the_reference_on_random_weights():
    torch.manual_seed(0)
    m = small()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 4, 10])
    out = m(x, t, y)
    assert out.shape == (3, 1, 8, 8)
    assert torch.allclose(out, ref_forward(m, x, t, y), atol=1e-5)
    # The downsampling path: 8 -> 4 -> 2, widths D -> 2D -> 4D.
    h = m.down2(m.down1(torch.zeros(1, 8, 8, 8)))
    assert h.shape == (1, 32, 2, 2)


def test_reference_initialisation():
    m = small()
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2])
    assert torch.equal(m(x, t, y), torch.zeros(2, 1, 8, 8))  # zero output layer
    blocks = [b for s in m.stages() for b in s.blocks]
    assert all(float(b.adaLN_modulation[1].weight.detach().abs().max()) == 0 for b in blocks)
    assert float(m.x_embedder.bias.detach().abs().max()) == 0
    assert 0.01 < float(m.y_embedders[0].embedding_table.weight.detach().std()) < 0.03


@pytest.mark.parametrize("kw, needle", [({"input_size": 10}, "multiple of 4"), ({"depth": (1, 1, 1)}, "model.depth"),
                                         ({"hidden_size": 7}, "even")])
def test_bad_configs_are_refused(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        small(**kw)


def test_hooks_are_refused():
    from flowdit.core.hooks import Hook, StepContext

    class H(Hook):
        def after_output(self, model, v, ctx):
            return v

    with pytest.raises(ConfigError, match="DiCo"):
        small()(torch.randn(1, 1, 8, 8), torch.rand(1), torch.tensor([1]), ctx=StepContext(hooks=[H()]))


def test_a_dico_run_trains_saves_and_samples_through_the_cli(tmp_path):
    from flowdit.cli import main
    from flowdit.inference import load_run_model

    rc = main(["train", "--no-progress", "model.name=DiCo-tiny", "train.batch_size=8", "train.steps=2",
               "train.sample_every=0", "sample.num_eval=10", "sample.steps=2", "train.precision=fp32",
               f"out_dir={tmp_path}", "name=d"])
    assert rc == 0
    model, meta = load_run_model(tmp_path / "d")
    assert isinstance(model, DiCo) and meta["model_class"] == "DiCo"
    assert main(["sample", "--ckpt", str(tmp_path / "d"), "--num", "4", "--steps", "2",
                 "--out", str(tmp_path / "s.png")]) == 0
