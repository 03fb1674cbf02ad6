"""
Autoregressive predictor AR: a Q-Former style cross-attention stack (NExT-Vid Sec. 3.2, Table 7).

For every token position of slots 1..T-1 (the "next frames") a query asks the encoder's
context what that position will look like, and answers with a latent z_t that is aligned to
the reference encoder's features c'_t (L_align) and conditions the decoder (L_flow).

- One zero-initialised query vector is shared by every target position [Table 7]; the
  positions differ only through 3D RoPE.
- The context c (encoder output) goes through LayerNorm -> Linear to the predictor width
  once, and is then used only as keys and values: the predictor never updates it
  ("context isolation"). There is no self-attention among queries.
- Autoregressive pattern: a query of slot t sees context tokens of slots < t only.
- Output: LayerNorm -> Linear back to the encoder width.
- previous_slot (not in the paper; tiny's recipe): the query of a target position also starts from
  the projected context token at the same position one slot earlier, where the mask kept it, and
  that context token is added to the output, so z_t = c_{t-1} + a learned change. A shared query
  told apart by RoPE alone gave every token of a slot nearly the same z_t at tiny's 400 steps, and
  the decoder had no token detail to draw (RESULTS.md, "Does the generator draw the next frame?"). Slot t-1 is
  context of slot t's queries anyway: the pattern stays autoregressive. The added c_{t-1} carries
  no gradient: through it L_align would pull the encoder's output at slot t-1 towards c'_t, which
  an encoder meets by dropping what moves (seed 2's online encoder read direction at 14.2 with
  the gradient, 56.0 without; RESULTS.md).

At enc_dim 1024 (ViT-L) it has about 22.1M parameters:
    python -c "from predictor import Predictor; print(Predictor(1024).num_params())"
"""
import torch
import torch.nn as nn

from encoder import Block, init_weights, positions
from masks import Pattern, slot_counts


class Predictor(nn.Module):

    def __init__(self, enc_dim, dim=384, depth=12, heads=12, mlp_ratio=4.0, previous_slot=False):
        super().__init__()
        self.previous_slot = previous_slot
        self.context_norm = nn.LayerNorm(enc_dim)
        self.context_proj = nn.Linear(enc_dim, dim)
        self.query = nn.Parameter(torch.zeros(dim))  # zero init, shared by all targets
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])  # cross-attention only
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, enc_dim)
        self.attn_impl = 'auto'
        self.apply(init_weights)

    def forward(self, context, keep, grid):
        """context (B, K, enc_dim) for the kept tokens `keep` (B, K) (None: all N tokens) of a
        (T, h, w) grid. Returns z (B, (T-1)*h*w, enc_dim): slots 1..T-1, slot-major."""
        T, h, w = grid
        S = h * w
        B = context.shape[0]
        features = context.detach()  # (B, K, enc_dim) the encoder output at the kept tokens, for the copy only
        context = self.context_proj(self.context_norm(context))  # (B, K, dim), used as key/value only
        context_pos = positions(grid).to(context.device)  # (N, 3)
        if keep is not None:
            context_pos = context_pos[keep]  # (B, K, 3)
        query_pos = positions(grid)[S:].to(context.device)  # (L, 3), L = (T-1)*S targets
        query = self.query.expand(B, len(query_pos), -1).contiguous()  # (B, L, dim), contiguous: one compiled graph for all blocks
        pattern = Pattern('autoregressive', (0,) + (S,) * (T - 1), slot_counts(keep, grid), self.attn_impl)
        if self.previous_slot:  # each query starts from the same position one slot earlier, where it was kept
            query = query + one_slot_earlier(context, keep, grid)  # (B, L, dim)
        for block in self.blocks:
            query = block(query, query_pos, pattern, context, context_pos)  # q + CrossAttn(LN(q), ctx), q + MLP(LN(q))
        z = self.out(self.norm(query))  # (B, L, enc_dim)
        return z + one_slot_earlier(features, keep, grid) if self.previous_slot else z

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


def one_slot_earlier(tokens, keep, grid):
    """tokens (B, K, C) at the kept positions `keep` (B, K) (None: all N) of a (T, h, w) grid ->
    (B, (T-1)*h*w, C): for each target position of slots 1..T-1, its token one slot earlier, zero
    where the mask dropped it."""
    T, h, w = grid
    if keep is not None:
        tokens = tokens.new_zeros(len(tokens), T * h * w, tokens.shape[-1]).scatter(1, keep[..., None].expand_as(tokens), tokens)
    return tokens[:, :-h * w]
