"""VA-VAE: the full config's size and LDM key names, loading, latent statistics, posterior
sampling, frame independence, and latents as ViT-aligned tokens."""
import math

import pytest
import torch
import torch.nn.functional as F

from vae import PREFIXES, VAE, AttnBlock, Resample, latent_frames, latent_patch, latent_tokens, load_vae

SMALL = dict(ch=8, ch_mult=(1, 2, 2), latent_channels=4, attn_resolutions=(8,), resolution=32)  # f4


def small_vae(seed=0):
    torch.manual_seed(seed)
    return VAE(**SMALL).eval()


def clip(B=2, F_=4, H=32, seed=0):
    return torch.rand(B, 3, F_, H, H, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -----------------------------------------------------------------------------
# the full VA-VAE: size and key names


def conv(cin, cout, k):
    return cin * cout * k * k + cout


def gn(c):
    return 2 * c


def res(cin, cout):
    return gn(cin) + conv(cin, cout, 3) + gn(cout) + conv(cout, cout, 3) + (conv(cin, cout, 1) if cin != cout else 0)


def attn(c):
    return gn(c) + 4 * conv(c, c, 1)


def test_full_config_sizes_and_ldm_keys():
    with torch.device('meta'):
        vae = VAE()
    counts = vae.num_params()
    # by hand, level by level: channels 128, 128, 256, 256, 512; attention at 16 x 16 (level 4)
    encoder = (conv(3, 128, 3)
               + 2 * res(128, 128) + conv(128, 128, 3)                  # down.0, 256 x 256
               + 2 * res(128, 128) + conv(128, 128, 3)                  # down.1, 128
               + res(128, 256) + res(256, 256) + conv(256, 256, 3)      # down.2, 64
               + 2 * res(256, 256) + conv(256, 256, 3)                  # down.3, 32
               + res(256, 512) + res(512, 512) + 2 * attn(512)          # down.4, 16
               + 2 * res(512, 512) + attn(512)                          # mid
               + gn(512) + conv(512, 64, 3) + conv(64, 64, 1))          # out, quant_conv
    decoder = (conv(32, 32, 1) + conv(32, 512, 3)                   # post_quant_conv, conv_in
               + 2 * res(512, 512) + attn(512)                          # mid
               + 3 * res(512, 512) + 3 * attn(512) + conv(512, 512, 3)  # up.4, 16
               + res(512, 256) + 2 * res(256, 256) + conv(256, 256, 3)  # up.3, 32
               + 3 * res(256, 256) + conv(256, 256, 3)                  # up.2, 64
               + res(256, 128) + 2 * res(128, 128) + conv(128, 128, 3)  # up.1, 128
               + 3 * res(128, 128)                                      # up.0, 256
               + gn(128) + conv(128, 3, 3))
    assert counts == {'encoder': encoder, 'decoder': decoder}
    assert abs(encoder - 28.4e6) / 28.4e6 < 0.01, encoder
    assert abs(decoder - 41.4e6) / 41.4e6 < 0.01, decoder
    assert (vae.factor, vae.latent_channels) == (16, 32)

    keys = vae.state_dict().keys()
    assert all(k.startswith(PREFIXES) for k in keys)
    for k in ['encoder.conv_in.weight', 'encoder.down.0.block.0.norm1.weight', 'encoder.down.0.block.0.conv1.weight',
              'encoder.down.2.block.0.nin_shortcut.weight', 'encoder.down.0.downsample.conv.weight',
              'encoder.down.4.attn.1.proj_out.weight', 'encoder.mid.block_1.conv2.bias', 'encoder.mid.attn_1.q.weight',
              'encoder.norm_out.weight', 'encoder.conv_out.weight', 'decoder.conv_in.weight', 'decoder.mid.attn_1.v.weight',
              'decoder.up.4.attn.0.k.weight', 'decoder.up.4.attn.2.norm.bias', 'decoder.up.0.block.2.conv2.weight',
              'decoder.up.1.upsample.conv.weight', 'decoder.up.3.block.0.nin_shortcut.weight',
              'decoder.norm_out.weight', 'decoder.conv_out.weight', 'quant_conv.weight', 'post_quant_conv.weight']:
        assert k in keys, k
    for k in ['encoder.down.4.downsample.conv.weight', 'decoder.up.0.upsample.conv.weight',
              'encoder.down.1.block.0.nin_shortcut.weight', 'encoder.down.3.attn.0.q.weight', 'decoder.up.3.attn.0.q.weight']:
        assert k not in keys, k
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert shapes['encoder.conv_out.weight'] == (64, 512, 3, 3)
    assert shapes['quant_conv.weight'] == (64, 64, 1, 1) and shapes['post_quant_conv.weight'] == (32, 32, 1, 1)
    assert shapes['decoder.conv_in.weight'] == (512, 32, 3, 3)


def test_blocks_match_ldm_formulas():
    """AttnBlock: softmax(q^T k / sqrt(C)) over positions; Resample: pad right/bottom and stride 2
    down, nearest x2 up."""
    torch.manual_seed(0)
    block, x = AttnBlock(8, 4), torch.randn(2, 8, 4, 5)
    h = block.norm(x)
    q, k, v = (f(h).flatten(2) for f in (block.q, block.k, block.v))  # (B, C, HW)
    weights = torch.softmax(q.transpose(1, 2) @ k / 8 ** 0.5, dim=-1)  # (B, HW query, HW key)
    expected = x + block.proj_out((v @ weights.transpose(1, 2)).reshape(x.shape))
    assert torch.allclose(block(x), expected, atol=1e-5)
    down, up, x = Resample(3, up=False), Resample(3, up=True), torch.randn(1, 3, 8, 8)
    assert torch.allclose(down(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2))
    nearest = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.allclose(up(x), F.conv2d(nearest, up.conv.weight, up.conv.bias, padding=1))
    assert down(x).shape == (1, 3, 4, 4) and up(x).shape == (1, 3, 16, 16)


# -----------------------------------------------------------------------------
# loading


def checkpoint(vae, nested):
    state = dict(vae.state_dict())
    state.update({'loss.logvar': torch.zeros(()), 'loss.discriminator.main.0.weight': torch.randn(4, 3, 4, 4),
                  'foundation_model.model.cls_token': torch.randn(1, 1, 8), 'linear_proj.weight': torch.randn(8, 4, 1, 1)})
    return {'state_dict': state, 'global_step': 7} if nested else state


@pytest.mark.parametrize('nested', [True, False])
def test_load_vae_reads_the_autoencoder_keys(tmp_path, nested):
    saved = small_vae(seed=1)
    torch.save(checkpoint(saved, nested), tmp_path / 'vae.pt')
    vae = load_vae(tmp_path / 'vae.pt', **SMALL)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    for k, v in saved.state_dict().items():
        assert torch.equal(vae.state_dict()[k], v), k
    assert torch.equal(vae.mean, torch.zeros(1, 4, 1, 1)) and torch.equal(vae.std, torch.ones(1, 4, 1, 1))


def test_load_vae_errors_name_the_keys_and_the_path(tmp_path):
    state = checkpoint(small_vae(), nested=True)
    del state['state_dict']['decoder.conv_out.bias']
    torch.save(state, tmp_path / 'missing.pt')
    with pytest.raises(ValueError, match=r"missing 1 \['decoder.conv_out.bias'\]"):
        load_vae(tmp_path / 'missing.pt', **SMALL)
    state = checkpoint(small_vae(), nested=False)
    state['encoder.down.9.block.0.conv1.weight'] = torch.zeros(1)
    torch.save(state, tmp_path / 'unexpected.pt')
    with pytest.raises(ValueError, match=r"unexpected 1 \['encoder.down.9.block.0.conv1.weight'\]"):
        load_vae(tmp_path / 'unexpected.pt', **SMALL)
    with pytest.raises(ValueError, match=r"other shape 7 \['decoder.conv_in.weight', 'encoder.conv_out.bias'"):
        load_vae(tmp_path / 'unexpected.pt', **{**SMALL, 'latent_channels': 8})
    with pytest.raises(FileNotFoundError, match='nowhere.pt'):
        load_vae(tmp_path / 'nowhere.pt', **SMALL)
    torch.save(checkpoint(small_vae(), nested=False), tmp_path / 'vae.pt')
    with pytest.raises(FileNotFoundError, match='stats.pt'):
        load_vae(tmp_path / 'vae.pt', tmp_path / 'stats.pt', **SMALL)


def known_posterior(vae, mean, logvar):
    """Make the posterior independent of the input: quant_conv gives (mean, logvar) everywhere."""
    with torch.no_grad():
        vae.quant_conv.weight.zero_()
        vae.quant_conv.bias.copy_(torch.cat([mean, logvar]))
    return vae


def test_stats_and_posterior_sampling(tmp_path):
    mean, logvar = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([0.0, 2 * math.log(0.5), 50.0, -80.0])
    torch.save(checkpoint(known_posterior(small_vae(), mean, logvar), nested=True), tmp_path / 'vae.pt')
    stats = {'mean': torch.tensor([0.5, 1.0, -1.0, 2.0]).reshape(1, 4, 1, 1), 'std': torch.tensor([2.0, 4.0, 0.5, 1.0]).reshape(1, 4, 1, 1)}
    torch.save(stats, tmp_path / 'stats.pt')
    vae = load_vae(tmp_path / 'vae.pt', tmp_path / 'stats.pt', **SMALL)
    frames = clip(B=2, F_=3)
    z = vae.encode(frames, sample=False)
    assert z.shape == (2, 4, 3, 8, 8)
    expected = ((mean - stats['mean'].flatten()) / stats['std'].flatten()).reshape(1, 4, 1, 1, 1)
    assert torch.allclose(z, expected.expand_as(z), atol=1e-6)
    # a sample: mean + exp(logvar / 2) * noise with logvar clamped to [-30, 20], the noise in (B*F, C, h, w) order
    noise = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    noise = noise.reshape(2, 3, 4, 8, 8).transpose(1, 2)  # (B, C, F, h, w)
    std = torch.exp(0.5 * logvar.clamp(-30, 20)).reshape(1, 4, 1, 1, 1)
    raw = mean.reshape(1, 4, 1, 1, 1) + std * noise
    expected = (raw - stats['mean'][..., None]) / stats['std'][..., None]
    assert torch.allclose(vae.encode(frames, generator=torch.Generator().manual_seed(3)), expected, rtol=1e-5, atol=1e-5)
    # decode un-normalises first: equal to the raw VAE decoding the raw latents
    plain = load_vae(tmp_path / 'vae.pt', **SMALL)
    assert torch.allclose(vae.decode(z), plain.decode(z * stats['std'][..., None] + stats['mean'][..., None]), atol=1e-5)
    with pytest.raises(ValueError, match='3 values'):
        vae.set_stats(torch.zeros(3), torch.ones(3))


# -----------------------------------------------------------------------------
# shapes, frames, tokens


def test_round_trip_shapes_and_tokens():
    vae = small_vae()
    assert (vae.factor, vae.latent_channels) == (4, 4)
    frames = clip(B=2, F_=4)
    with torch.no_grad():
        z = vae.encode(frames)
        assert z.shape == (2, 4, 4, 8, 8)
        p = latent_patch(8, vae.factor)  # a ViT patch of 8 pixels covers 2 x 2 latent pixels
        tokens = latent_tokens(z, p)
        grid = (2, 4, 4)  # the ViT's grid of the (2, 3, 4, 32, 32) clip, tubelet 2, patch 8
        assert tokens.shape == (2, 2 * 4 * 4, 2 * 4 * p * p)
        assert torch.equal(latent_frames(tokens, grid, p), z)
        assert vae.decode(latent_frames(tokens, grid, p)).shape == frames.shape
    with pytest.raises(ValueError, match='not divisible'):
        vae.encode(clip(H=30))


def test_token_layout_by_hand():
    z = torch.arange(2 * 3 * 4 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 4, 6)  # (B, C, F, h, w)
    P, tokens = 2, latent_tokens(z, 2)  # grid (2, 2, 3)
    assert tokens.shape == (2, 12, 2 * 2 * 2 * 3)
    b, t, y, x = 1, 1, 0, 2
    n = (t * 2 + y) * 3 + x  # slot-major (t, y, x)
    for pt in range(2):
        for py in range(P):
            for px in range(P):
                for c in range(3):
                    i = ((pt * P + py) * P + px) * 3 + c  # (pt ph pw c)
                    assert tokens[b, n, i] == z[b, c, 2 * t + pt, y * P + py, x * P + px]
    # the paper's case, f16 latents and ViT patch 16: one latent pixel, the slot's two frames stacked
    z = torch.randn(1, 32, 4, 2, 2)
    tokens = latent_tokens(z, latent_patch(16, 16))
    assert tokens.shape == (1, 2 * 2 * 2, 64)
    assert torch.equal(tokens[0, 7], torch.cat([z[0, :, 2, 1, 1], z[0, :, 3, 1, 1]]))
    for patch, factor in [(8, 16), (24, 16), (6, 4)]:
        with pytest.raises(ValueError, match='not a multiple'):
            latent_patch(patch, factor)


def test_frames_are_independent():
    vae, frames = small_vae(), clip(B=2, F_=3)
    with torch.no_grad():
        z = vae.encode(frames, sample=False)
        one_by_one = torch.cat([vae.encode(frames[:, :, i:i + 1], sample=False) for i in range(3)], dim=2)
        assert torch.allclose(z, one_by_one, atol=1e-5)
        assert torch.allclose(vae.decode(z), torch.cat([vae.decode(z[:, :, i:i + 1]) for i in range(3)], dim=2), atol=1e-5)
        draw = lambda seed: vae.encode(frames, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(draw(0), draw(0))
        assert not torch.allclose(draw(0), draw(1)) and not torch.allclose(draw(0), z)
