"""
Encoder E: a ViT with 3D RoPE and frame-wise causal attention (NExT-Vid Sec. 3.1, Table 7).

The clip (B, 3, F, H, W) is cut into 2 x p x p tubelets by a Conv3d, giving T = F/2 slots of
h*w tokens each, numbered slot-major. Tokens the input mask hides are dropped before the
first block (MAE style); every kept token keeps its true (t, y, x) for the rotary embedding.
Attention is frame-wise causal, so one pass yields c_t for every slot, each c_t depending
only on slots <= t. The same class serves as the reference encoder E_ref (an EMA copy that
sees the whole clip, built in train.py).

The building blocks here (positions, rope, Attention, MLP) are reused by predictor.py and
decoder.py. Print the sizes' parameter counts with:
    python -c "from encoder import *; [print(n, Encoder(**c).num_params()) for n, c in SIZES.items()]"
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from masks import Pattern, attend, slot_counts

# l, h, g as the paper's Table 7 (g: hidden 6144 = 1408 * 48/11); tiny, s, b decided here
SIZES = {
    'tiny': dict(dim=192, depth=6, heads=3, patch=8),  # 64 x 64 clips on a CPU
    's': dict(dim=384, depth=12, heads=6),
    'b': dict(dim=768, depth=12, heads=12),
    'l': dict(dim=1024, depth=24, heads=16),
    'h': dict(dim=1280, depth=32, heads=16),
    'g': dict(dim=1408, depth=40, heads=22, mlp_ratio=48 / 11),
}

# -----------------------------------------------------------------------------
# 3D rotary position embedding


def positions(grid):
    """(t, y, x) of every token of a (T, h, w) grid, slot-major: (T*h*w, 3) float."""
    T, h, w = grid
    t, y, x = torch.meshgrid(torch.arange(T), torch.arange(h), torch.arange(w), indexing='ij')
    return torch.stack([t, y, x], dim=-1).reshape(-1, 3).float()


def rope(x, pos):
    """Rotate x (B, heads, L, d) by positions pos (L, 3) or (B, L, 3).

    The head dimension is split in three equal even parts for t, y and x (any remainder is
    left unrotated); within a part, pairs (2i, 2i+1) turn by angle pos / 10000^(2i/part).
    """
    d = x.shape[-1]
    part = d // 3 // 2 * 2
    freqs = 1.0 / 10000 ** (torch.arange(0, part, 2, device=x.device).float() / part)  # (part/2,)
    angles = torch.cat([pos[..., axis, None].to(x.device) * freqs for axis in range(3)], -1)  # (..., L, 3*part/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, L, 3*part/2): one set of positions per sample
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    rotated, rest = x[..., :3 * part], x[..., 3 * part:]
    x1, x2 = rearrange(rotated, '... (n two) -> two ... n', two=2)
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rearrange(rotated, '... n two -> ... (n two)'), rest], dim=-1)


# -----------------------------------------------------------------------------
# blocks


class Attention(nn.Module):
    """Multi-head attention with 3D RoPE under a Pattern. Self-attention when `context` is
    None; otherwise queries come from x and keys/values from `context` (cross-attention)."""

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, pos, pattern, context=None, context_pos=None):
        context, context_pos = (x, pos) if context is None else (context, context_pos)
        q = rearrange(self.q(x), 'b l (h d) -> b h l d', h=self.heads)
        k, v = rearrange(self.kv(context), 'b l (two h d) -> two b h l d', two=2, h=self.heads)
        out = attend(rope(q, pos), rope(k, context_pos), v, pattern)  # (B, heads, Lq, d)
        return self.proj(rearrange(out, 'b h l d -> b l (h d)'))


def MLP(dim, mlp_ratio):
    hidden = round(dim * mlp_ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)). The attention is
    self-attention, or cross-attention to `context` (keys and values only) when it is given."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x, pos, pattern, context=None, context_pos=None):
        x = x + self.attn(self.norm1(x), pos, pattern, context, context_pos)
        return x + self.mlp(self.norm2(x))


def init_weights(module):
    """Truncated-normal linear and conv weights, zero biases (ViT / MAE convention)."""
    if isinstance(module, (nn.Linear, nn.Conv3d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# -----------------------------------------------------------------------------
# the encoder


class Encoder(nn.Module):

    def __init__(self, dim, depth, heads, mlp_ratio=4.0, patch=16, tubelet=2):
        super().__init__()
        self.config = dict(dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio, patch=patch, tubelet=tubelet)
        self.dim, self.patch, self.tubelet = dim, patch, tubelet
        self.embed = nn.Conv3d(3, dim, kernel_size=(tubelet, patch, patch), stride=(tubelet, patch, patch))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.attn_impl = 'auto'  # see masks.attend; bench.py and tests switch it
        self.grad_checkpointing = False  # recompute each block in backward to save memory
        self.apply(init_weights)

    def grid(self, video):
        """(T, h, w) token grid of a (B, 3, F, H, W) clip."""
        _, _, F_, H, W = video.shape
        if F_ % self.tubelet or H % self.patch or W % self.patch:
            raise ValueError(f"clip {tuple(video.shape)} is not divisible into {self.tubelet}x{self.patch}x{self.patch} tubelets")
        return F_ // self.tubelet, H // self.patch, W // self.patch

    def forward(self, video, keep=None, last=1):
        """video (B, 3, F, H, W); keep (B, K) sorted token indices with the same number per
        slot in every sample, or None for all N tokens. Returns (B, K or N, last * dim): the
        outputs of the last `last` blocks, each through the final LayerNorm, on channels."""
        T, h, w = self.grid(video)
        x = rearrange(self.embed(video), 'b d t h w -> b (t h w) d')  # (B, N, D)
        pos = positions((T, h, w)).to(x.device)  # (N, 3)
        if keep is not None:
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, D)
            pos = pos[keep]  # (B, K, 3)
        counts = slot_counts(keep, (T, h, w))
        pattern = Pattern('causal', counts, counts, self.attn_impl)
        outputs = []
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, pos, pattern, use_reentrant=False)
            else:
                x = block(x, pos, pattern)
            if i >= len(self.blocks) - last:
                outputs.append(self.norm(x))
        return torch.cat(outputs, dim=-1)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())
