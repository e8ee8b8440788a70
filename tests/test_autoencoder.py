"""The latent space: diffusers' AutoencoderKL architecture, factors from data, folders."""

import pytest
import torch

pytest.importorskip("diffusers")

from flowdit.errors import ConfigError  # noqa: E402
from flowdit.models.autoencoder import (  # noqa: E402
    AutoencoderConfig,
    LatentSpace,
    build_autoencoder,
    latent_statistics,
)

TINY = AutoencoderConfig(in_channels=3, latent_channels=4, block_out_channels=[8, 16, 16], norm_num_groups=8)


def images(n, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_latent_statistics_normalise_the_latents():
    torch.manual_seed(0)
    vae = build_autoencoder(TINY).eval()
    batches = [images(8, s) for s in range(3)]
    shift, scale = latent_statistics(vae, batches, seed=1)
    # The same samples, drawn again, have zero mean and unit variance after normalising.
    g = torch.Generator().manual_seed(1)
    zs = []
    with torch.no_grad():
        for x in batches:
            post = vae.encode(x).latent_dist
            zs.append(post.mean + post.std * torch.randn(post.mean.shape, generator=g))
    z = (torch.cat(zs).double() - shift) * scale
    assert abs(float(z.mean())) < 1e-9 and abs(float(z.std(unbiased=False)) - 1) < 1e-9


def test_latent_space_maps_shapes_and_inverts_its_normalisation():
    torch.manual_seed(0)
    space = LatentSpace(build_autoencoder(TINY).eval(), scaling_factor=1.7, shift_factor=0.2)
    assert space.factor == 4 and space.latent_shape((3, 16, 16)) == (4, 4, 4)
    x = images(2)
    z = space.encode(x)
    assert z.shape == (2, 4, 4, 4)
    post = space.vae.encode(x).latent_dist
    torch.testing.assert_close(z, (post.mean - 0.2) * 1.7)
    torch.testing.assert_close(space.decode(z), space.vae.decode(post.mean).sample, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="multiple"):
        space.latent_shape((3, 18, 16))


def test_a_saved_latent_space_loads_back_as_a_diffusers_folder(tmp_path):
    torch.manual_seed(0)
    space = LatentSpace(build_autoencoder(TINY).eval(), scaling_factor=0.9, shift_factor=-0.1)
    space.save_pretrained(str(tmp_path / "vae"))
    back = LatentSpace.from_pretrained(str(tmp_path / "vae"))
    assert (back.scaling_factor, back.shift_factor) == (0.9, -0.1)
    x = images(2)
    torch.testing.assert_close(back.encode(x), space.encode(x), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="no config.json"):
        LatentSpace.from_pretrained(str(tmp_path))


def test_bad_architectures_are_refused_by_key():
    with pytest.raises(ConfigError, match="norm_num_groups"):
        build_autoencoder(AutoencoderConfig(block_out_channels=[8, 12], norm_num_groups=8))
    with pytest.raises(ConfigError, match="scaling_factor"):
        LatentSpace(build_autoencoder(TINY), scaling_factor=0.0)
