"""bench.py's FLOP formula against PyTorch's own count of the same training step."""
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench import flops_per_clip
from decoder import Decoder
from encoder import Encoder
from masks import sample_keep
from predictor import Predictor
from nextvid import NextVid


def math_attention(q, k, v, attn_mask=None):
    """SDPA written as matmuls, so FlopCounterMode sees the attention FLOPs (it misses the CPU kernel)."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float('-inf'))
    return scores.softmax(-1) @ v


def test_flop_formula_matches_counted_flops(monkeypatch):
    monkeypatch.setattr(F, 'scaled_dot_product_attention', math_attention)
    torch.manual_seed(0)
    encoder = Encoder(dim=64, depth=2, heads=2, patch=8)
    model = NextVid(encoder, Predictor(64, dim=48, depth=2, heads=2), Decoder(64, 384, dim=48, depth=2, heads=2))
    for module in (encoder, model.predictor, model.decoder):
        module.attn_impl = 'slots'  # SDPA over exactly the allowed keys, so the counter sees only those pairs
    video = torch.randn(2, 3, 8, 32, 32)
    grid = encoder.grid(video)
    generator = torch.Generator().manual_seed(0)
    keeps = [sample_keep(2, grid, 2, 0.15, generator=generator), sample_keep(2, grid, 1, 0.5, generator=generator)]
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            target = F.layer_norm(encoder(video), (64,))
        flow, align = model(video, target, keeps, tau_repeats=2)
        (flow + align).backward()
    kept = [k.shape[1] // grid[0] for k in keeps]
    formula = 2 * flops_per_clip(encoder, model.predictor, model.decoder, grid, kept, tau_repeats=2)
    counted = counter.get_total_flops()
    assert abs(formula - counted) / counted < 0.02, (formula, counted)


def test_vae_encoder_flops_match_counted_flops(monkeypatch):
    from bench import vae_encoder_flops
    from vae import VAE
    monkeypatch.setattr(F, 'scaled_dot_product_attention', math_attention)
    vae = VAE(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=32, latent_channels=4)
    frames = torch.randn(1, 3, 2, 32, 32)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.encode(frames, sample=False)
    counted = counter.get_total_flops()
    assert abs(2 * vae_encoder_flops(vae, 32, 32) - counted) / counted < 0.02, counted
