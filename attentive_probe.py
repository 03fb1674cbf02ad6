"""
The attentive probe's pieces (NExT-Vid Table 10, V-JEPA's protocol): the head that reads a frozen
encoder's tokens; PixelTokens, the "no encoder" floor that probe.py --pixels puts in its place; and
train_probes, which trains one head per (lr, weight decay) on the same features and validates each.

    python -c "from attentive_probe import *; import torch; print(AttentiveProbe(192, 16, 8)(torch.randn(2, 256, 192)).shape)"
"""
import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from tqdm import tqdm

from decoder import patchify
from encoder import MLP, init_weights


class AttentiveProbe(nn.Module):
    """V-JEPA's attentive probe: one learnable query cross-attends to the layer-normed tokens, then
    an MLP residual, a LayerNorm and a linear classifier.

    With one query, attention is computed without projecting the L tokens (an exact rewrite, about
    D/heads times less work): a head's score q.(W_k x + b_k) is (W_k^T q).x plus a constant the
    softmax ignores, and its output sum_j a_j (W_v x_j + b_v) is W_v (sum_j a_j x_j) + b_v."""

    def __init__(self, dim, heads, classes):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, dim))
        self.norm_tokens = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 4.0)
        self.norm_out = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, classes)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.query, std=0.02)

    def forward(self, tokens):
        """tokens (B, L, D) -> logits (B, classes)"""
        tokens = self.norm_tokens(tokens)
        q = rearrange(self.q(self.query), '1 (h d) -> h d', h=self.heads)  # (H, d)
        w_k = rearrange(self.k.weight, '(h d) c -> h d c', h=self.heads)  # (H, d, D)
        key_of_query = torch.einsum('hd,hdc->hc', q, w_k) / q.shape[-1] ** 0.5  # (H, D)
        weights = torch.einsum('bld,hd->bhl', tokens, key_of_query).softmax(-1)  # (B, H, L)
        pooled = torch.einsum('bhl,bld->bhd', weights, tokens)  # (B, H, D)
        w_v = rearrange(self.v.weight, '(h d) c -> h d c', h=self.heads)  # (H, d, D)
        heads = torch.einsum('bhc,hdc->bhd', pooled, w_v) + rearrange(self.v.bias, '(h d) -> h d', h=self.heads)
        x = self.query + self.proj(rearrange(heads, 'b h d -> b (h d)'))  # (B, D)
        x = x + self.mlp(self.norm_mlp(x))
        return self.classifier(self.norm_out(x))


def predict(probe, tokens):
    """tokens (B, V, L, D) -> class probabilities (B, classes): the softmax averaged over the V views."""
    logits = probe(rearrange(tokens, 'b v l d -> (b v) l d'))  # (B*V, classes)
    return rearrange(logits.float().softmax(-1), '(b v) c -> b v c', v=tokens.shape[1]).mean(1)


class PixelTokens(nn.Module):
    """--pixels, the floor: each tubelet x patch x patch x 3 cube of the clip, in the Encoder's token
    order (decoder.patchify), through one fixed random linear map to `dim` channels, its weights
    N(0, 1/fan_in) drawn from `seed` (a buffer: nothing trains). Called as an Encoder is."""

    def __init__(self, patch, tubelet, dim, seed):
        super().__init__()
        self.patch, self.tubelet, self.dim = patch, tubelet, dim
        fan_in = tubelet * patch * patch * 3
        weight = torch.randn(fan_in, dim, generator=torch.Generator().manual_seed(seed)) / fan_in ** 0.5
        self.register_buffer('weight', weight)

    def forward(self, video, last=1):
        """video (B, 3, F, H, W) -> tokens (B, N, dim); one "layer", so `last` must be 1."""
        if last != 1:
            raise ValueError(f'PixelTokens has one layer, not {last}')
        return patchify(video, self.patch, self.tubelet) @ self.weight.to(video.dtype)

    def num_params(self):
        """Entries of the fixed map (none of them trained)."""
        return self.weight.numel()


# -----------------------------------------------------------------------------
# training probes on features: `batches` are any object with len() (batches an epoch) and .epoch(e),
# an iterator of (tokens (B, V, L, D), labels (B,)) (probe.py's EncodedVideos and CachedFeatures)


def autocast(device):
    return torch.autocast('cuda', torch.bfloat16) if device.type == 'cuda' else nullcontext()


def evaluate(probes, batches):
    """Top-1 (percent) of every probe, the softmax averaged over views."""
    correct, seen = torch.zeros(len(probes)), 0
    with torch.no_grad():
        for tokens, labels in tqdm(batches.epoch(0), total=len(batches), desc='validation', leave=False):
            for i, probe in enumerate(probes):
                with autocast(tokens.device):
                    correct[i] += (predict(probe, tokens).argmax(-1) == labels).sum().item()
            seen += len(labels)
    return (100 * correct / seen).tolist()


def cosine_schedule(optimizer, total_steps):
    """The lr multiplied by half a cosine, 1 -> 0 over total_steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))


def train_step(probe, optimizer, scheduler, tokens, labels):
    """One optimizer step of cross-entropy on tokens (B, V, L, D), each view a sample (training uses
    one); returns how many of the B*V predictions were right."""
    labels = repeat(labels, 'b -> (b v)', v=tokens.shape[1])
    with autocast(tokens.device):
        logits = probe(rearrange(tokens, 'b v l d -> (b v) l d')).float()  # (B*V, classes)
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return (logits.argmax(-1) == labels).sum().item()


def train_probes(train_batches, val_batches, dim, classes, heads, epochs, device, grid, seed=0):
    """Train one AttentiveProbe per (lr, weight decay) of `grid` on the same batches; validate after
    every epoch. Returns, per probe, its lr, weight decay and train / validation top-1 per epoch."""
    torch.manual_seed(seed)
    probes = [AttentiveProbe(dim, heads, classes).to(device) for _ in grid]
    optimizers = [torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=wd) for probe, (lr, wd) in zip(probes, grid)]
    schedulers = [cosine_schedule(optimizer, epochs * len(train_batches)) for optimizer in optimizers]
    history = [dict(lr=lr, weight_decay=wd, train_top1=[], val_top1=[]) for lr, wd in grid]
    for epoch in range(epochs):
        correct, seen = torch.zeros(len(probes)), 0
        bar = tqdm(train_batches.epoch(epoch), total=len(train_batches), desc=f'epoch {epoch + 1}/{epochs}',
                   dynamic_ncols=True)
        for tokens, labels in bar:
            for i, (probe, optimizer, scheduler) in enumerate(zip(probes, optimizers, schedulers)):
                correct[i] += train_step(probe, optimizer, scheduler, tokens, labels)  # one probe's graph at a time
            seen += tokens.shape[0] * tokens.shape[1]
        val_top1 = evaluate(probes, val_batches)
        for record, train_correct, top1 in zip(history, correct.tolist(), val_top1):
            record['train_top1'].append(100 * train_correct / seen)
            record['val_top1'].append(top1)
        bar.write(f'epoch {epoch + 1}: best val top-1 {max(val_top1):.2f}, '
                  f'best train top-1 {100 * correct.max().item() / seen:.2f}')
    return history
