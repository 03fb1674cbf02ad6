"""
Masks: which tokens the encoder sees, and which token may attend to which.

NExT-Vid (arXiv 2512.21004, Sec. 3 and Table 8) hides part of every clip from the
encoder and predicts each next frame from the visible past. Two kinds of mask live here:

1. The input mask (`sample_keep`): multi-block and temporally consistent, as in V-JEPA.
   A spatial mask over the (h, w) token grid is the union of rectangular blocks and is
   the same for every slot. Two generators run over two copies of the batch: 8 blocks of
   scale 0.15 and 2 blocks of scale 0.7, aspect ratio in [0.75, 1.5] [Table 8].
2. The attention patterns (`Pattern`), each an explicit rule on slot indices:
       frame-wise causal  (encoder)    key slot <= query slot
       autoregressive     (predictor)  key slot <  query slot
       frame-isolated     (decoder)    key slot == query slot
   `Pattern.matrix()` materialises the rule as a boolean [Lq, Lk] matrix (True = may
   attend). `attend` is the one attention function all three modules call; its fast
   paths compute exactly what the matrix says, and tests/test_masks.py proves it.

See a pattern for 3 slots of 2 tokens each:
    python -c "from masks import Pattern; print(Pattern('causal', (2,2,2), (2,2,2)).matrix().int())"

Index convention (MAE style): tokens are numbered slot-major, n = t*h*w + y*w + x, and
`keep` holds, for every sample, the sorted numbers of the tokens the encoder sees.
"""
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from einops import rearrange

# -----------------------------------------------------------------------------
# input mask


def block_size(grid_hw, scale, aspect, generator):
    """Height and width (in tokens) of one block covering `scale` of the grid."""
    H, W = grid_hw
    ratio = aspect[0] + (aspect[1] - aspect[0]) * torch.rand(1, generator=generator).item()
    area = scale * H * W
    h = min(max(round(math.sqrt(area * ratio)), 1), H)
    w = min(max(round(math.sqrt(area / ratio)), 1), W)
    return h, w


def draw_mask(grid_hw, num_blocks, block_hw, generator=None):
    """One sample's spatial mask (h, w), True = masked: the union of num_blocks blocks."""
    (H, W), (h, w) = grid_hw, block_hw
    masked = torch.zeros(H, W, dtype=torch.bool)
    for _ in range(num_blocks):
        top = torch.randint(0, H - h + 1, (1,), generator=generator).item()
        left = torch.randint(0, W - w + 1, (1,), generator=generator).item()
        masked[top:top + h, left:left + w] = True
    return masked


@lru_cache(maxsize=None)
def kept_count(grid_hw, num_blocks, scale, aspect=(0.75, 1.5)):
    """How many spatial positions every sample of this mask generator keeps: the 5th percentile
    of one draw's kept count (1000 draws at a fixed seed; at least 1). Fixed per generator and
    grid, so the encoder's sequence length, and compiled attention's shapes, never change from
    batch to batch. It is about what V-JEPA's batch minimum gave at micro-batch 16 (tests)."""
    generator = torch.Generator().manual_seed(0)
    kept = sorted(int((~draw_mask(grid_hw, num_blocks, block_size(grid_hw, scale, aspect, generator), generator)).sum())
                  for _ in range(1000))
    return max(kept[len(kept) // 20], 1)


def sample_keep(batch, grid, num_blocks, scale, aspect=(0.75, 1.5), generator=None):
    """Kept-token indices (B, T*k) for one mask generator, k = kept_count(...) positions per slot.

    Each sample draws a block size and block positions; a draw that keeps fewer than k
    positions is redrawn (about 5% of draws), one that keeps more drops random extras (a
    position is dropped in every slot, so no late slot is ever dropped whole). V-JEPA instead
    draws the block size once per batch and keeps the batch minimum, a count that changes
    with every batch and with the micro-batch size.
    """
    T, H, W = grid
    k = kept_count((H, W), num_blocks, scale, aspect)
    kept = []
    for _ in range(batch):
        for _attempt in range(1000):
            masked = draw_mask((H, W), num_blocks, block_size((H, W), scale, aspect, generator), generator)
            if (~masked).sum() >= k:
                break
        else:
            raise ValueError(f"{num_blocks} blocks of scale {scale} mask the whole {H}x{W} grid")
        positions = (~masked).flatten().nonzero().squeeze(1)  # (k_b,) spatial positions, k_b >= k
        kept.append(positions[torch.randperm(len(positions), generator=generator)[:k]].sort().values)
    spatial = torch.stack(kept)  # (B, k)
    slot_start = torch.arange(T) * H * W  # (T,)
    keep = spatial[:, None, :] + slot_start[None, :, None]  # (B, T, k)
    return rearrange(keep, 'b t k -> b (t k)')


def parse_masks(spec):
    """The --masks flag, '8x0.15,2x0.7': one (blocks, scale) pair per mask generator."""
    try:
        return [(int(b), float(s)) for b, s in (g.split('x') for g in spec.split(','))]
    except ValueError:
        raise SystemExit(f"--masks {spec!r}: expected blocks x scale pairs, e.g. '8x0.15,2x0.7'")


def slot_counts(keep, grid):
    """How many of the tokens `keep` (B, K) (None: all) fall in each slot of a (T, h, w) grid.
    Every sample keeps the same count per slot, so the first row speaks for the batch."""
    T, h, w = grid
    if keep is None:
        return (h * w,) * T
    return tuple(torch.bincount(keep[0] // (h * w), minlength=T).tolist())


# -----------------------------------------------------------------------------
# attention patterns

RULES = {
    'causal': lambda q, k: k <= q,          # encoder: a slot sees itself and the past
    'autoregressive': lambda q, k: k < q,   # predictor: a target sees strictly earlier context
    'isolated': lambda q, k: k == q,        # decoder: each slot alone
}


@dataclass(frozen=True)
class Pattern:
    """Who may attend to whom. Tokens are slot-major; q_counts[t] (k_counts[t]) is how many
    query (key) tokens belong to slot t, so the slot of every token follows from the counts."""
    rule: str
    q_counts: tuple
    k_counts: tuple
    impl: str = 'auto'  # how `attend` computes it: auto, dense, slots or flex

    def __post_init__(self):
        if self.rule not in RULES or self.impl not in IMPLS:
            raise ValueError(f"rule must be one of {list(RULES)} and impl one of {IMPLS}")
        if len(self.q_counts) != len(self.k_counts):
            raise ValueError("q_counts and k_counts must have one entry per slot")
        if any(n and self.key_range(t)[0] == self.key_range(t)[1] for t, n in enumerate(self.q_counts)):
            raise ValueError(f"some query may attend to no key under {self}")

    @staticmethod
    def slots(counts):
        """Slot index of every token, e.g. (2, 1) -> [0, 0, 1]."""
        return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))

    def matrix(self, device=None):
        """The rule as a boolean (Lq, Lk) matrix, True = may attend."""
        q, k = self.slots(self.q_counts), self.slots(self.k_counts)
        return RULES[self.rule](q[:, None], k[None, :]).to(device)

    def key_range(self, t):
        """Keys that slot t's queries may see form one contiguous run [lo, hi)."""
        start = sum(self.k_counts[:t])
        end = start + self.k_counts[t]
        return {'causal': (0, end), 'autoregressive': (0, start), 'isolated': (start, end)}[self.rule]


# -----------------------------------------------------------------------------
# the attention function

IMPLS = ('auto', 'dense', 'slots', 'flex')
# Measured by bench.py (README, Performance). On CUDA, flex was 8% faster at l with one fixed mask;
# kept counts are now fixed per generator (kept_count), so compiled flex would compile once, but it is
# not the default until a GPU measures the training step with it.
DEFAULT_IMPL = {'cpu': 'slots', 'cuda': 'slots'}


def attend(q, k, v, pattern):
    """Attention of q (B, H, Lq, d) over k, v (B, H, Lk, d) under `pattern`; returns (B, H, Lq, d).

    dense: one SDPA call with the boolean matrix (the reference).
    slots: per query slot, one SDPA call over its contiguous run of keys; frame-isolated
           patterns with equal slots fold the slots into the batch instead (one call).
    flex:  FlexAttention with a block mask built from the same rule (compiled on CUDA).
    """
    impl = pattern.impl if pattern.impl != 'auto' else DEFAULT_IMPL.get(q.device.type, 'dense')
    if impl == 'dense':
        return F.scaled_dot_product_attention(q, k, v, attn_mask=pattern.matrix(q.device))
    if impl == 'flex':
        return _flex(q.device.type)(q, k, v, block_mask=_block_mask(pattern, q.device))
    if pattern.rule == 'isolated' and pattern.q_counts == pattern.k_counts and len(set(pattern.q_counts)) == 1:
        fold = lambda x: rearrange(x, 'b h (t n) d -> (b t) h n d', n=pattern.q_counts[0])
        out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v))  # (B*T, H, n, d)
        return rearrange(out, '(b t) h n d -> b h (t n) d', b=q.shape[0])
    out, q_start = [], 0
    for t, count in enumerate(pattern.q_counts):
        if count == 0:
            continue
        lo, hi = pattern.key_range(t)
        out.append(F.scaled_dot_product_attention(q[:, :, q_start:q_start + count], k[:, :, lo:hi], v[:, :, lo:hi]))
        q_start += count
    return torch.cat(out, dim=2)


@lru_cache(maxsize=None)
def _flex(device_type):
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention) if device_type == 'cuda' else flex_attention


@lru_cache(maxsize=32)
def _block_mask(pattern, device):
    from torch.nn.attention.flex_attention import create_block_mask
    q_slot = Pattern.slots(pattern.q_counts).to(device)
    k_slot = Pattern.slots(pattern.k_counts).to(device)
    rule = RULES[pattern.rule]
    mask_mod = lambda b, h, qi, ki: rule(q_slot[qi], k_slot[ki])
    return create_block_mask(mask_mod, None, None, len(q_slot), len(k_slot), device=device)
