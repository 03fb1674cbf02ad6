"""
Attentive probe on a frozen NExT-Vid encoder (SPEC section 4, Table 10).

    python probe.py --ckpt out/ckpt.pt                  # synthetic clips, direction of motion, CPU minutes
    python probe.py --ckpt out/ckpt.pt --label shape    # the appearance label instead
    python probe.py --random_init --size tiny           # a random encoder: the baseline for every result
    python probe.py --ckpt out_l/ckpt.pt --preset k400 --train k400_train.txt --val k400_val.txt

A video gives `segments` clips spread over its length; each is encoded on its own and their tokens
are concatenated along the token axis. The probe (one learnable query cross-attending to the tokens,
an MLP, a linear classifier) trains on one view per video with the training augmentation; validation
averages its softmax over `views` spatial crops. One probe per (lr, weight decay) of the preset's grid trains on
the same features (the encoder runs once per batch), and the best by validation top-1 at the last
epoch is reported. Without augmentation (synthetic clips, or --cache) features are computed once
and kept in memory, so epochs only run the probes. Prints `top1: <percent>` last and writes every
probe's curves and the arguments to a JSON file (--out, default next to the checkpoint).
"""
import argparse
import json
import math
import os
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from data import make_dataset
from encoder import MLP, SIZES, Encoder, init_weights
from nextvid import RECIPE

# Table 10, and `synthetic` sized for a CPU (the tiny encoder at 8 x 64 x 64 in a few minutes).
# frames / fps None: the values the encoder was pretrained with.
# One probe per (lr, weight decay) of `grid` (AdamW, cosine lr). A one-query probe sits at chance for
# hundreds of steps before its attention finds the object (measured on the synthetic clips: lr 1e-3
# needs 20 epochs to leave chance, 1e-2 half that), hence the high lrs; synthetic keeps the CPU cheap.
GRID = [(lr, wd) for lr in (1e-2, 3e-3, 1e-3) for wd in (0.01, 0.1)]
PRESETS = {
    'synthetic': dict(segments=1, views=1, frames=None, fps=None, batch_size=64, epochs=20, layers=1,
                      grid=[(1e-2, 0.01), (3e-3, 0.01)]),
    'k400': dict(segments=8, views=3, frames=16, fps=4.0, batch_size=192, epochs=20, layers=1, grid=GRID),
    'in1k': dict(segments=1, views=1, frames=16, fps=None, batch_size=384, epochs=20, layers=1, grid=GRID),  # image repeated
    'ssv2': dict(segments=2, views=3, frames=16, fps=4.0, batch_size=96, epochs=20, layers=1, grid=GRID),
    'diving48': dict(segments=4, views=3, frames=32, fps=2.0, batch_size=48, epochs=100, layers=4, grid=GRID),
}
# Synthetic probe clips: train and validation clips, and one object each (no distractors), so that
# the label names the only moving thing (with distractors even a random encoder's probe is at chance).
SYNTHETIC_SIZES = (4000, 1000)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ckpt', default='out/ckpt.pt', help='a train.py checkpoint')
    p.add_argument('--weights', choices=['ema', 'online'], default='ema', help="which of the checkpoint's encoders")
    p.add_argument('--random_init', action='store_true', help='probe a randomly initialised encoder (seeded by --seed)')
    p.add_argument('--size', choices=list(SIZES), help='size of the --random_init encoder (default tiny)')
    p.add_argument('--preset', choices=list(PRESETS), default='synthetic', help='Table 10 settings; flags override them')
    p.add_argument('--train', help='training data: a "path label" list or a folder of image class folders '
                   '(default: synthetic clips)')
    p.add_argument('--val', help='validation data, as --train')
    p.add_argument('--label', choices=['direction', 'shape'], default='direction',
                   help='synthetic label: direction of motion (needs motion) or shape (appearance)')
    p.add_argument('--train_size', type=int, help=f'videos per training epoch (default: every file once; '
                   f'{SYNTHETIC_SIZES[0]} synthetic clips)')
    p.add_argument('--val_size', type=int, help=f'validation videos (default: every file; '
                   f'{SYNTHETIC_SIZES[1]} synthetic clips)')
    p.add_argument('--segments', type=int, help='clips per video, spread over it, tokens concatenated')
    p.add_argument('--views', type=int, help='spatial crops per validation video, softmax averaged')
    p.add_argument('--frames', type=int, help="frames per clip (default: the preset's, else the checkpoint's)")
    p.add_argument('--fps', type=float, help="frame rate sampled from videos (default: the preset's, else the checkpoint's)")
    p.add_argument('--resolution', type=int, help="default: the checkpoint's")
    p.add_argument('--batch_size', type=int, help='videos per training batch (validation: batch_size // views)')
    p.add_argument('--epochs', type=int)
    p.add_argument('--layers', type=int, help='features: the last N encoder blocks, concatenated on channels')
    p.add_argument('--heads', type=int, default=16, help='heads of the probe cross-attention')
    p.add_argument('--cache', action='store_true', help='no training augmentation: encode every video once and keep '
                   'the features in memory (always so for synthetic clips)')
    p.add_argument('--num_workers', type=int, help='data loader processes (default: 0 on CPU, 8 on GPU)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--out', help='JSON results (default: probe_<label or preset>.json next to the checkpoint, '
                   'probe_random_<size>_<label or preset>.json for --random_init)')
    args = p.parse_args(argv)
    if args.size and not args.random_init:
        p.error('--size is for --random_init; a checkpoint knows its own size')
    if (args.train is None) != (args.val is None):
        p.error('give both --train and --val, or neither for synthetic clips')
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def autocast(device):
    return torch.autocast('cuda', torch.bfloat16) if device.type == 'cuda' else nullcontext()


def load_encoder(args):
    """The frozen encoder, in eval mode. Fills frames, resolution and fps not given from its pretraining."""
    if args.random_init:
        args.size = args.size or 'tiny'
        torch.manual_seed(args.seed)
        encoder = Encoder(**SIZES[args.size])
        pretraining = RECIPE[args.size]  # what train.py would pretrain that size with
    else:
        if not os.path.isfile(args.ckpt):
            raise SystemExit(f'no checkpoint at {args.ckpt}: make one with `python train.py` (it writes out/ckpt.pt), '
                             f'or probe a random encoder with --random_init --size tiny')
        checkpoint = torch.load(args.ckpt, map_location='cpu', weights_only=True)
        encoder = Encoder(**checkpoint['encoder_config'])
        encoder.load_state_dict(checkpoint['ema_encoder' if args.weights == 'ema' else 'encoder'])
        pretraining = checkpoint['args']
    for key in ('frames', 'resolution', 'fps'):
        if getattr(args, key) is None:
            setattr(args, key, pretraining[key])
    return encoder.eval().requires_grad_(False)


def encode(encoder, clips, layers, chunk):
    """clips (B, V, S, 3, F, H, W) -> tokens (B, V, S*N, layers*D): every segment of every view is
    encoded on its own (`chunk` clips per forward) and its N tokens follow in segment order."""
    B, V = clips.shape[:2]
    flat = rearrange(clips, 'b v s c f h w -> (b v s) c f h w')
    with torch.no_grad(), autocast(clips.device):
        tokens = torch.cat([encoder(part, last=layers) for part in flat.split(chunk)])  # (B*V*S, N, layers*D)
    return rearrange(tokens, '(b v s) n d -> b v (s n) d', b=B, v=V)


# -----------------------------------------------------------------------------
# the probe


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


# -----------------------------------------------------------------------------
# features: batches of (tokens (B, V, L, D), labels (B,)) from .epoch(e), len() batches an epoch


class EncodedVideos:
    """`size` videos of a dataset encoded on the fly, `batch_size` a batch. A training set reads items
    e*size .. (e+1)*size - 1 in epoch e (new crops, segment offsets and file order each epoch)."""

    def __init__(self, dataset, size, batch_size, encode_clips, classes, train, num_workers):
        self.dataset, self.size, self.batch_size, self.encode_clips = dataset, size, batch_size, encode_clips
        self.classes, self.train, self.num_workers = classes, train, num_workers

    def __len__(self):
        return math.ceil(self.size / self.batch_size)

    def epoch(self, epoch):
        first = epoch * self.size if self.train else 0
        loader = DataLoader(Subset(self.dataset, range(first, first + self.size)), self.batch_size,
                            num_workers=self.num_workers)
        for clips, labels in loader:  # clips (B, V, S, 3, F, H, W)
            wrong = labels[(labels < 0) | (labels >= self.classes)]
            if len(wrong):
                raise ValueError(f'label {wrong[0].item()} is out of range: the training data has {self.classes} '
                                 f'classes, labels 0 .. {self.classes - 1}')
            tokens = self.encode_clips(clips)
            yield tokens, labels.to(tokens.device)


class CachedFeatures:
    """Tokens (n, V, L, D) and labels (n,) in memory, in batches, reshuffled each epoch when `shuffle`."""

    def __init__(self, tokens, labels, batch_size, shuffle):
        self.tokens, self.labels, self.batch_size, self.shuffle = tokens, labels, batch_size, shuffle

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def epoch(self, epoch):
        n = len(self.labels)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)) if self.shuffle else torch.arange(n)
        for batch in order.split(self.batch_size):
            yield self.tokens[batch], self.labels[batch]


def cache(videos, shuffle, name):
    """Encode every video of an EncodedVideos once."""
    tokens, labels = zip(*tqdm(videos.epoch(0), total=len(videos), desc=f'encoding {name}', dynamic_ncols=True))
    return CachedFeatures(torch.cat(tokens), torch.cat(labels), videos.batch_size, shuffle)


# -----------------------------------------------------------------------------
# training and evaluation


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


def train_probes(train_batches, val_batches, dim, classes, heads, epochs, device, grid, seed=0):
    """Train one AttentiveProbe per (lr, weight decay) of `grid` on the same batches; validate after
    every epoch. Returns, per probe, its lr, weight decay and train / validation top-1 per epoch."""
    torch.manual_seed(seed)
    probes = [AttentiveProbe(dim, heads, classes).to(device) for _ in grid]
    optimizers = [torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=wd) for probe, (lr, wd) in zip(probes, grid)]
    total_steps = epochs * len(train_batches)
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps))  # lr multiplier, 1 -> 0
    schedulers = [torch.optim.lr_scheduler.LambdaLR(optimizer, cosine) for optimizer in optimizers]
    history = [dict(lr=lr, weight_decay=wd, train_top1=[], val_top1=[]) for lr, wd in grid]
    for epoch in range(epochs):
        correct, seen = torch.zeros(len(probes)), 0
        bar = tqdm(train_batches.epoch(epoch), total=len(train_batches), desc=f'epoch {epoch + 1}/{epochs}',
                   dynamic_ncols=True)
        for tokens, labels in bar:
            labels = repeat(labels, 'b -> (b v)', v=tokens.shape[1])
            tokens = rearrange(tokens, 'b v l d -> (b v) l d')  # training uses one view: (B, L, D)
            for i, (probe, optimizer, scheduler) in enumerate(zip(probes, optimizers, schedulers)):
                with autocast(tokens.device):
                    logits = probe(tokens).float()  # (B, classes)
                loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # one probe's graph at a time: memory of one probe
                optimizer.step()
                scheduler.step()
                correct[i] += (logits.argmax(-1) == labels).sum().item()
            seen += len(labels)
        val_top1 = evaluate(probes, val_batches)
        for record, train_correct, top1 in zip(history, correct.tolist(), val_top1):
            record['train_top1'].append(100 * train_correct / seen)
            record['val_top1'].append(top1)
        bar.write(f'epoch {epoch + 1}: best val top-1 {max(val_top1):.2f}, '
                  f'best train top-1 {100 * correct.max().item() / seen:.2f}')
    return history


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    encoder = load_encoder(args).to(device)
    dim = encoder.dim * args.layers
    if dim % args.heads:
        raise SystemExit(f'--heads {args.heads} does not divide the feature width {dim} ({args.layers} x {encoder.dim})')
    # synthetic clips: seeds apart from train.py's (0 and 1), so no probe clip was a pretraining clip
    common = dict(frames=args.frames, resolution=args.resolution, fps=args.fps, segments=args.segments, label=args.label,
                  distractors=0)
    train_set = make_dataset(args.train or 'synthetic', train=not args.cache, seed=args.seed + 1000, views=1, **common)
    val_set = make_dataset(args.val or 'synthetic', train=False, seed=args.seed + 2000, views=args.views, **common)
    for flag, dataset in (('--train', train_set), ('--val', val_set)):
        if dataset.num_classes == 0:
            raise SystemExit(f'{flag} {getattr(args, flag[2:])} is unlabeled: the probe needs a "path label" list '
                             f'or a folder of image class folders')
    classes = train_set.num_classes
    train_size = args.train_size or (len(train_set) if args.train else SYNTHETIC_SIZES[0])
    val_size = args.val_size or (len(val_set) if args.val else SYNTHETIC_SIZES[1])
    num_workers = args.num_workers if args.num_workers is not None else (8 if device.type == 'cuda' else 0)
    encode_clips = lambda clips: encode(encoder, clips.to(device), args.layers, chunk=args.batch_size)
    train_batches = EncodedVideos(train_set, train_size, args.batch_size, encode_clips, classes, True, num_workers)
    val_batches = EncodedVideos(val_set, val_size, max(1, args.batch_size // args.views), encode_clips, classes,
                                False, num_workers)
    source = 'random init ' + args.size if args.random_init else f'{args.ckpt} ({args.weights})'
    print(f'encoder {source}, {encoder.num_params() / 1e6:.1f}M, last {args.layers} block(s) on {device} | '
          f'{args.train or "synthetic " + args.label}: {classes} classes, {train_size} train / {val_size} val videos | '
          f'{args.segments} segments x {args.views} views of {args.frames} frames at {args.resolution}px')
    if args.cache or args.train is None:
        train_batches, val_batches = cache(train_batches, True, 'train'), cache(val_batches, False, 'val')

    history = train_probes(train_batches, val_batches, dim, classes, args.heads, args.epochs, device, args.grid, args.seed)
    best = max(history, key=lambda record: record['val_top1'][-1])
    for record in history:
        print(f"lr {record['lr']:.0e} wd {record['weight_decay']:g}: train top-1 {record['train_top1'][-1]:.2f}, "
              f"val top-1 {record['val_top1'][-1]:.2f}")
    name = args.label if args.train is None else args.preset
    out = args.out or os.path.join(os.path.dirname(args.ckpt),
                                   f'probe_random_{args.size}_{name}.json' if args.random_init else f'probe_{name}.json')
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    result = dict(top1=best['val_top1'][-1], best_lr=best['lr'], best_weight_decay=best['weight_decay'],
                  probes=history, args=vars(args))
    with open(out, 'w') as f:
        json.dump(result, f, indent=1)
    print(f'wrote {out}')
    print(f"top1: {result['top1']:.2f}")
    return result


if __name__ == '__main__':
    main()
