"""
The attentive probe's pieces (NExT-Vid Table 10, V-JEPA's protocol): the head that reads a frozen
encoder's tokens; PixelTokens, the "no encoder" floor that probe.py --pixels puts in its place; the
features heads train on (clips encoded on the fly, or cached), each rank holding its share;
ProbeGrid / train_probes, one head per (lr, weight decay) trained on the same features; and
train_supervised, probe.py --supervised's ceiling: the encoder trained end to end with one head.

Under torchrun every global batch is split over the ranks (rank r takes the videos whose number in
the epoch is r modulo the ranks), each rank weights its mean loss by its share of the batch, and the
heads' gradients are summed over the ranks: N ranks take the steps one process takes on the whole
batch, up to float rounding. Validation sums the right answers of all ranks, each video counted once.

    python -c "from attentive_probe import *; import torch; print(AttentiveProbe(192, 16, 8)(torch.randn(2, 256, 192)).shape)"
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from torch.utils.data import DataLoader
from tqdm import tqdm

from decoder import patchify
from encoder import MLP, init_weights
from runtime import autocast


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
# features: batches of (tokens (b, V, L, D) or None, labels (b,), videos in the global batch) from
# .epoch(e), this rank's share of each global batch (None: no video of it), len() batches an epoch


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_sum(values):
    """A list of numbers summed over the ranks (float64: counts stay exact)."""
    if not dist.is_initialized():
        return values
    summed = torch.tensor(values, dtype=torch.float64, device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
    dist.all_reduce(summed)
    return summed.tolist()


def encode(encoder, clips, layers, chunk, dtype, grad=False):
    """clips (B, V, S, 3, F, H, W) -> tokens (B, V, S*N, layers*D): every segment of every view is
    encoded on its own (`chunk` clips per forward) and its N tokens follow in segment order.
    grad: keep the graph (--supervised trains the encoder)."""
    B, V = clips.shape[:2]
    flat = rearrange(clips, 'b v s c f h w -> (b v s) c f h w')
    with torch.set_grad_enabled(grad), autocast(clips.device, dtype):
        tokens = torch.cat([encoder(part, last=layers) for part in flat.split(chunk)])  # (B*V*S, N, layers*D)
    return rearrange(tokens, '(b v s) n d -> b v (s n) d', b=B, v=V)


class EncodedVideos:
    """`size` videos of a dataset encoded on the fly by encode_clips (--supervised trains on clips:
    encode_clips moves them), `batch_size` a global batch. A training set reads items e*size ..
    (e+1)*size - 1 in epoch e (new crops, segment offsets and file order each epoch), others items
    0 .. size - 1; this rank reads those whose number in the epoch is its rank modulo the ranks."""

    def __init__(self, dataset, size, batch_size, encode_clips, classes, train, num_workers):
        self.dataset, self.size, self.batch_size, self.encode_clips = dataset, size, batch_size, encode_clips
        self.classes, self.train, self.num_workers = classes, train, num_workers
        self.rank, self.world = rank_and_world()

    def __len__(self):
        return math.ceil(self.size / self.batch_size)

    def epoch(self, epoch):
        first = epoch * self.size if self.train else 0
        starts = range(0, self.size, self.batch_size)
        shares = [[first + j for j in range(start, min(start + self.batch_size, self.size)) if j % self.world == self.rank]
                  for start in starts]
        loaded = iter(DataLoader(self.dataset, batch_sampler=[share for share in shares if share],
                                 num_workers=self.num_workers))
        for start, share in zip(starts, shares):
            videos = min(self.batch_size, self.size - start)
            if not share:
                yield None, torch.zeros(0, dtype=torch.long), videos
                continue
            clips, labels = next(loaded)  # clips (b, V, S, 3, F, H, W)
            wrong = labels[(labels < 0) | (labels >= self.classes)]
            if len(wrong):
                raise ValueError(f'label {wrong[0].item()} is out of range: the training data has {self.classes} '
                                 f'classes, labels 0 .. {self.classes - 1}')
            tokens = self.encode_clips(clips)
            yield tokens, labels.to(tokens.device), videos


class CachedFeatures:
    """This rank's tokens (n, V, L, D) and labels (n,) of `size` videos, video j at j // world when j is
    its rank modulo the ranks (as EncodedVideos reads them); global batches of `batch_size`, the same
    on every rank, reshuffled each epoch when `shuffle`."""

    def __init__(self, tokens, labels, batch_size, shuffle, size=None):
        self.tokens, self.labels, self.batch_size, self.shuffle = tokens, labels, batch_size, shuffle
        self.size = len(labels) if size is None else size
        self.rank, self.world = rank_and_world()

    def __len__(self):
        return math.ceil(self.size / self.batch_size)

    def epoch(self, epoch):
        n = self.size
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)) if self.shuffle else torch.arange(n)
        for batch in order.split(self.batch_size):
            mine = batch[batch % self.world == self.rank] // self.world
            yield (self.tokens[mine] if len(mine) else None), self.labels[mine], len(batch)


def cache(videos, shuffle, name):
    """Encode this rank's share of an EncodedVideos once."""
    bar = tqdm(videos.epoch(0), total=len(videos), desc=f'encoding {name}', dynamic_ncols=True, disable=videos.rank > 0)
    shares = [(tokens, labels) for tokens, labels, _ in bar if tokens is not None]
    tokens = torch.cat([tokens for tokens, _ in shares]) if shares else None  # None: fewer videos than ranks
    labels = torch.cat([labels for _, labels in shares]) if shares else torch.zeros(0, dtype=torch.long)
    return CachedFeatures(tokens, labels, videos.batch_size, shuffle, videos.size)


# -----------------------------------------------------------------------------
# training a grid of heads on features


def cosine_schedule(optimizer, total_steps):
    """The lr multiplied by half a cosine, 1 -> 0 over total_steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))


class ProbeGrid:
    """One AttentiveProbe per (lr, weight decay) of `grid`, drawn from `seed` (the same heads on every
    rank), each with its AdamW and a cosine lr over `total_steps`; state_dict() is what resumes them."""

    def __init__(self, grid, dim, heads, classes, total_steps, device, seed=0):
        torch.manual_seed(seed)
        self.grid = grid
        self.probes = [AttentiveProbe(dim, heads, classes).to(device) for _ in grid]
        self.optimizers = [torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=wd)
                           for probe, (lr, wd) in zip(self.probes, grid)]
        self.schedulers = [cosine_schedule(optimizer, total_steps) for optimizer in self.optimizers]

    def state_dict(self):
        return {name: [part.state_dict() for part in getattr(self, name)] for name in ('probes', 'optimizers', 'schedulers')}

    def load_state_dict(self, state):
        for name in ('probes', 'optimizers', 'schedulers'):
            for part, saved in zip(getattr(self, name), state[name], strict=True):
                part.load_state_dict(saved)


def train_step(probe, optimizer, scheduler, tokens, labels, videos, dtype):
    """One optimizer step of cross-entropy on a global batch of `videos` videos, of which this rank
    holds tokens (b, V, L, D) (None: none) and labels (b,), each view a sample (training uses one).
    The rank's mean loss is weighted by b / videos and the gradients are summed over the ranks: the
    whole batch's mean. Returns how many of this rank's b*V predictions were right."""
    optimizer.zero_grad(set_to_none=True)
    correct = 0
    if tokens is not None:
        labels = repeat(labels, 'b -> (b v)', v=tokens.shape[1])
        with autocast(tokens.device, dtype):
            logits = probe(rearrange(tokens, 'b v l d -> (b v) l d')).float()  # (b*V, classes)
        (F.cross_entropy(logits, labels) * (len(tokens) / videos)).backward()
        correct = (logits.argmax(-1) == labels).sum().item()
    if dist.is_initialized():
        params = list(probe.parameters())
        grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        dist.all_reduce(grads)  # one call per head and step
        for p, grad in zip(params, grads.split([p.numel() for p in params])):
            p.grad = grad.view_as(p)
    optimizer.step()
    scheduler.step()
    return correct


def evaluate(probes, batches, dtype):
    """Top-1 (percent) of every probe over all ranks' videos, the softmax averaged over views, and the
    number of videos counted (each once: the ranks' shares do not overlap)."""
    correct, seen = [0] * len(probes), 0
    with torch.no_grad():
        for tokens, labels, _ in tqdm(batches.epoch(0), total=len(batches), desc='validation', leave=False,
                                      disable=batches.rank > 0):
            if tokens is None:
                continue
            for i, probe in enumerate(probes):
                with autocast(tokens.device, dtype):
                    correct[i] += (predict(probe, tokens).argmax(-1) == labels).sum().item()
            seen += len(labels)
    *correct, seen = all_sum(correct + [seen])
    return (100 * torch.tensor(correct, dtype=torch.float32) / seen).tolist(), int(seen)


def train_probes(train_batches, val_batches, grid, epochs, dtype='fp32', history=None, after_epoch=None, stop=None):
    """Train the heads of a ProbeGrid on the same batches from the epoch after those in `history`
    (a record per head: lr, weight decay, train / validation top-1 per epoch) to `epochs`, validating
    after each and calling after_epoch(history); stop() (asked after every step, the same answer on
    every rank) ends the epoch early and leaves it out. Returns the history."""
    history = history or [dict(lr=lr, weight_decay=wd, train_top1=[], val_top1=[]) for lr, wd in grid.grid]
    parts = list(zip(grid.probes, grid.optimizers, grid.schedulers))
    for epoch in range(len(history[0]['val_top1']), epochs):
        correct, seen = [0] * len(parts), 0
        bar = tqdm(train_batches.epoch(epoch), total=len(train_batches), desc=f'epoch {epoch + 1}/{epochs}',
                   dynamic_ncols=True, disable=train_batches.rank > 0)
        for tokens, labels, videos in bar:
            for i, part in enumerate(parts):
                correct[i] += train_step(*part, tokens, labels, videos, dtype)  # one head's graph at a time
            seen += 0 if tokens is None else tokens.shape[0] * tokens.shape[1]
            if stop and stop():
                return history
        *correct, seen = all_sum(correct + [seen])
        val_top1, _ = evaluate(grid.probes, val_batches, dtype)
        for record, train_correct, top1 in zip(history, correct, val_top1):
            record['train_top1'].append(100 * train_correct / seen)
            record['val_top1'].append(top1)
        if train_batches.rank == 0:
            bar.write(f'epoch {epoch + 1}: best val top-1 {max(val_top1):.2f}, '
                      f'best train top-1 {100 * max(correct) / seen:.2f}')
        if after_epoch:
            after_epoch(history)
    return history


def train_supervised(encoder, train_batches, val_batches, classes, heads, epochs, lr, weight_decay, layers=1, seed=0,
                     dtype='fp32'):
    """--supervised: `encoder` (in train mode) and one AttentiveProbe trained together by AdamW on the
    clips of train_batches, validated after every epoch (the encoder in eval mode) on val_batches, whose
    encode_clips must use this `encoder`. Returns train_probes' record of the probe, with encoder_lr."""
    torch.manual_seed(seed)
    head = AttentiveProbe(encoder.dim * layers, heads, classes).to(next(encoder.parameters()).device)
    # The head's lr is the probe grid's, high so that its one query leaves chance early (probe.py GRID); a ViT
    # from scratch is usually trained by AdamW at 1e-3 or less, so the encoder takes a tenth of the
    # head's: 1e-3 for the synthetic preset's 1e-2 (a choice, not tuned on these clips).
    optimizer = torch.optim.AdamW([dict(params=encoder.parameters(), lr=lr / 10), dict(params=head.parameters())],
                                  lr=lr, weight_decay=weight_decay)
    scheduler = cosine_schedule(optimizer, epochs * len(train_batches))
    record = dict(lr=lr, encoder_lr=lr / 10, weight_decay=weight_decay, train_top1=[], val_top1=[])
    for epoch in range(epochs):
        encoder.train()
        correct, seen = 0, 0
        bar = tqdm(train_batches.epoch(epoch), total=len(train_batches), desc=f'epoch {epoch + 1}/{epochs}',
                   dynamic_ncols=True)
        for clips, labels, videos in bar:
            tokens = encode(encoder, clips, layers, len(clips), dtype, grad=True)  # (B, V, L, D)
            correct += train_step(head, optimizer, scheduler, tokens, labels, videos, dtype)
            seen += tokens.shape[0] * tokens.shape[1]
        encoder.eval()
        record['train_top1'].append(100 * correct / seen)
        record['val_top1'] += evaluate([head], val_batches, dtype)[0]
        bar.write(f"epoch {epoch + 1}: val top-1 {record['val_top1'][-1]:.2f}, train top-1 {record['train_top1'][-1]:.2f}")
    return record
