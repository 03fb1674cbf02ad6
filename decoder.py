"""
Flow-matching decoder G: a small DiT that generates each next frame (NExT-Vid Sec. 3.3, Table 7).

Given the predictor's latent z_t for every token of slot t and a noisy target
x_tau = (1 - tau) x0 + tau x1 (x0 noise, x1 the slot's pixels), the decoder gives the
velocity v = x1 - x0, and the loss regresses it (Eq. 7). Its input per token is the channel
concatenation [z_t, x_tau] (same slot, same position) -> Linear -> width 384. Blocks are DiT
blocks with adaLN-Zero: the timestep embedding of 1000 * tau gives shift, scale and gate for
attention and MLP, and the modulation and output layers start at zero, so every block starts
as the identity. Attention is frame-isolated: slot t's tokens see only slot t, so the decoder
cannot copy from other frames and must rely on z_t.

Parameterisation, the one difference from the paper (which regresses v with the network's
output directly, prediction='v'): with prediction='x' the network outputs the clean target
x_hat and the velocity follows as v_hat = (x_hat - x_tau) / max(1 - tau, 0.05), the loss's
target being (x1 - x_tau) / max(1 - tau, 0.05) (JiT: Li & He, "Back to Basics: Let Denoising
Generative Models Denoise", 2025). Why: a token's target (384 values at tiny, 1536 at s..g) is
far wider than the network (192, 384); clean frames lie near a low-dimensional manifold and
noise does not, so a narrow network can output the first and not the velocity (at tiny, v
gives colour noise, RESULTS.md). The clamp keeps v_hat finite as tau -> 1.

Sampling (`euler`): integrate the velocity from tau = 0 (noise) to tau = 1 (data); with x-prediction
the last step lands on the clean estimate x_hat.

`patchify` / `unpatchify` turn a clip into the pixel targets (one 2 x p x p x 3 cube of
pixels per token, slot-major) and back. At enc_dim 1024 with a 64-channel target the
decoder has about 32.9M parameters:
    python -c "from decoder import Decoder; print(Decoder(1024, 64).num_params())"
"""
import math

import torch
import torch.nn as nn
from einops import rearrange, repeat
from torch.utils.checkpoint import checkpoint

from encoder import MLP, Attention, init_weights, positions
from masks import Pattern


def patchify(video, patch, tubelet=2):
    """(B, 3, F, H, W) -> (B, N, tubelet*patch*patch*3) pixel targets, slot-major."""
    return rearrange(video, 'b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)', pt=tubelet, ph=patch, pw=patch)


def unpatchify(tokens, grid, patch, tubelet=2):
    """(B, T*h*w, tubelet*patch*patch*3) -> (B, 3, T*tubelet, h*patch, w*patch)."""
    T, h, w = grid
    return rearrange(tokens, 'b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)',
                     t=T, h=h, w=w, pt=tubelet, ph=patch, pw=patch)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of 1000 * tau, then an MLP (as in DiT)."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, tau):  # (...,) in [0, 1] -> (..., dim)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=tau.device).float() / half)
        angles = 1000 * tau[..., None].float() * freqs
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """adaLN-Zero: the condition gives shift, scale, gate for attention and for the MLP."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, mlp_ratio)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, cond, pos, pattern):  # x (B, L, dim), cond (B, n, dim): one per slot
        modulation = self.modulation(cond).repeat_interleave(x.shape[1] // cond.shape[1], dim=1)  # (B, L, 6*dim)
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), pos, pattern)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class Decoder(nn.Module):

    def __init__(self, enc_dim, target_dim, dim=384, depth=12, heads=12, mlp_ratio=4.0, prediction='v'):
        super().__init__()
        if prediction not in ('x', 'v'):
            raise ValueError(f"prediction must be 'x' (clean target) or 'v' (velocity), not {prediction!r}")
        self.prediction = prediction
        self.embed = nn.Linear(enc_dim + target_dim, dim)
        self.time = TimestepEmbedder(dim)
        self.blocks = nn.ModuleList([DiTBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, target_dim)
        self.attn_impl = 'auto'
        self.grad_checkpointing = False  # recompute each block in backward (its input is G*R copies of the clip)
        self.apply(init_weights)
        for layer in [b.modulation[-1] for b in self.blocks] + [self.final_modulation[-1], self.out]:
            nn.init.zeros_(layer.weight)  # adaLN-Zero
            nn.init.zeros_(layer.bias)

    def forward(self, x_tau, z, tau, grid, min_gap=0.05):
        """x_tau (B, L, target_dim), z (B, L, enc_dim), tau (B, n) one value per slot,
        grid (n, h, w) with L = n*h*w. Returns the velocity (B, L, target_dim); for 'x',
        (x_hat - x_tau) / max(1 - tau, min_gap)."""
        out = self.network(x_tau, z, tau, grid)
        if self.prediction == 'v':
            return out
        return to_velocity(out, x_tau, repeat(tau, 'b n -> b (n s) 1', s=grid[1] * grid[2]), min_gap)

    def flow_target(self, x0, x1, tau):
        """What forward() regresses: v = x1 - x0 for 'v'; JiT's (x1 - x_tau) / max(1 - tau, 0.05) for
        'x', the same v wherever 1 - tau >= 0.05. x0, x1 (B, L, target_dim), tau (B, L, 1)."""
        if self.prediction == 'v':
            return x1 - x0
        return to_velocity(x1, (1 - tau) * x0 + tau * x1, tau)

    def network(self, x_tau, z, tau, grid):
        """The transformer's own output (B, L, target_dim): x_hat for 'x', the velocity for 'v'."""
        n, h, w = grid
        x = self.embed(torch.cat([z, x_tau], dim=-1))  # (B, L, dim)
        cond = self.time(tau)  # (B, n, dim): one tau per slot, modulating that slot's tokens
        pos = positions(grid).to(x.device)  # (L, 3)
        pattern = Pattern('isolated', (h * w,) * n, (h * w,) * n, self.attn_impl)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, cond, pos, pattern, use_reentrant=False)
            else:
                x = block(x, cond, pos, pattern)
        shift, scale = self.final_modulation(cond).repeat_interleave(h * w, dim=1).chunk(2, dim=-1)
        return self.out(modulate(self.final_norm(x), shift, scale))

    @torch.no_grad()
    def sample(self, z, grid, steps=50, generator=None):
        """Generate targets (B, L, target_dim) for latents z (B, L, enc_dim) by Euler steps."""
        noise = torch.randn(*z.shape[:2], self.out.out_features, generator=generator, device='cpu').to(z.device)  # fp32
        n = grid[0]
        # 1 - tau >= 1/steps at every Euler step, so with that gap the clamp never binds and the last
        # step lands on x_hat itself (with 0.05 at 50 steps it moved 40% of the way: 1.4% noise stayed)
        velocity = lambda x, tau: self(x, z, tau.expand(z.shape[0], n), grid, min_gap=1 / steps)
        return euler(velocity, noise, steps)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


def to_velocity(x_hat, x_tau, tau, min_gap=0.05):
    """The velocity that reaches x_hat from x_tau at time tau: (x_hat - x_tau) / max(1 - tau, 0.05) (JiT)."""
    return (x_hat - x_tau) / (1 - tau).clamp_min(min_gap)


def euler(velocity, noise, steps):
    """Integrate dx/dtau = velocity(x, tau) from tau = 0 (x = noise) to tau = 1 (data)."""
    x = noise
    for i in range(steps):
        tau = torch.full((1, 1), i / steps, device=x.device)
        x = x + velocity(x, tau).float() / steps  # fp32 under bf16 autocast too
    return x
