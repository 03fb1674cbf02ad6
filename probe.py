"""
Attentive probe on a frozen NExT-Vid encoder (SPEC section 4, Table 10).

    python probe.py --ckpt out/ckpt.pt                  # synthetic clips, direction of motion, CPU minutes
    python probe.py --ckpt out/ckpt.pt --label shape    # the appearance label instead
    python probe.py --random_init --size tiny           # a random encoder: the baseline for every result
    python probe.py --pixels --size tiny --label shape      # the floor: no encoder, raw tubelets
    python probe.py --supervised --size tiny --label shape  # the ceiling: the encoder trained on the labels
    python probe.py --ckpt out_l/ckpt.pt --preset k400 --train k400_train.txt --val k400_val.txt

A video gives `segments` clips spread over its length; each is encoded on its own and their tokens
are concatenated along the token axis. The probe (one learnable query cross-attending to the tokens,
an MLP, a linear classifier) trains on one view per video with the training augmentation; validation
averages its softmax over `views` spatial crops. One probe per (lr, weight decay) of the preset's grid trains on
the same features (the encoder runs once per batch), and the best by validation top-1 at the last
epoch is reported. Without augmentation (synthetic clips, or --cache) features are computed once
and kept in memory, so epochs only run the probes. Prints `top1: <percent>` last and writes every
probe's curves, the arguments and the mode (frozen, pixels or supervised) to a JSON file (--out,
default next to the checkpoint).

--pixels, the floor: no encoder; each 2 x p x p x 3 tubelet (p: the checkpoint's patch, or --size's)
through one fixed random linear map (seeded) to the encoder's width, tokens shaped as the encoder's.
--supervised, the ceiling at this budget: that architecture from random init (seeded) trained end to
end with one probe (AdamW, the grid's first lr and weight decay, a tenth of that lr for the encoder),
validated as above after every epoch. A backward pass per clip per epoch is slow, so on synthetic
clips it trains on the first SUPERVISED_TRAIN_SIZE (1000) of the frozen probe's 4000 unless --train_size.
"""
import argparse
import json
import math
import os

import torch
from einops import rearrange
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from attentive_probe import AttentiveProbe, PixelTokens, autocast, cosine_schedule, evaluate, train_probes, train_step
from data import make_dataset
from encoder import SIZES, Encoder
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
SUPERVISED_TRAIN_SIZE = 1000  # --supervised's synthetic training clips (the first of the frozen probe's 4000)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ckpt', default='out/ckpt.pt', help='a train.py checkpoint')
    p.add_argument('--weights', choices=['ema', 'online'], default='ema', help="which of the checkpoint's encoders")
    p.add_argument('--random_init', action='store_true', help='probe a randomly initialised encoder (seeded by --seed)')
    p.add_argument('--size', choices=list(SIZES), help='size of the --random_init encoder (default tiny), or the '
                   'architecture for --pixels / --supervised instead of the checkpoint\'s')
    mode = p.add_mutually_exclusive_group()
    mode.add_argument('--pixels', action='store_true', help='the floor: probe the raw tubelets through a fixed random '
                      'linear map to the encoder width (no encoder)')
    mode.add_argument('--supervised', action='store_true', help='the ceiling: train the encoder architecture from '
                      'random init end to end with one probe on the labels')
    p.add_argument('--preset', choices=list(PRESETS), default='synthetic', help='Table 10 settings; flags override them')
    p.add_argument('--train', help='training data: a "path label" list or a folder of image class folders '
                   '(default: synthetic clips)')
    p.add_argument('--val', help='validation data, as --train')
    p.add_argument('--label', choices=['direction', 'shape'], default='direction',
                   help='synthetic label: direction of motion (needs motion) or shape (appearance)')
    p.add_argument('--train_size', type=int, help=f'videos per training epoch (default: every file once; '
                   f'{SYNTHETIC_SIZES[0]} synthetic clips, {SUPERVISED_TRAIN_SIZE} for --supervised)')
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
                   'probe_<random, pixels or supervised>_<size>_<label or preset>.json for those modes)')
    args = p.parse_args(argv)
    if args.size and not (args.random_init or args.pixels or args.supervised):
        p.error('--size is for --random_init, --pixels and --supervised; a checkpoint knows its own size')
    if args.pixels:
        if (args.layers or 1) > 1:
            p.error('--pixels has one "layer" (the tubelets): --layers must be 1')
        args.layers = 1  # also over a preset's
    if (args.train is None) != (args.val is None):
        p.error('give both --train and --val, or neither for synthetic clips')
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def load_encoder(args):
    """The checkpoint's encoder, or for --random_init or --size that size's (default tiny) at random
    init, frozen in eval mode; for --pixels a PixelTokens of its patch and width instead; for
    --supervised its architecture at random init, trainable. Fills args.size, and frames, resolution
    and fps not given, from its pretraining."""
    checkpoint = None
    if args.random_init or args.size:
        args.size = args.size or 'tiny'
        config, pretraining = SIZES[args.size], RECIPE[args.size]  # what train.py would pretrain that size with
    else:
        if not os.path.isfile(args.ckpt):
            raise SystemExit(f'no checkpoint at {args.ckpt}: make one with `python train.py` (it writes out/ckpt.pt), '
                             f'or probe a random encoder with --random_init --size tiny')
        checkpoint = torch.load(args.ckpt, map_location='cpu', weights_only=True)
        config, pretraining, args.size = checkpoint['encoder_config'], checkpoint['args'], checkpoint['args']['size']
    for key in ('frames', 'resolution', 'fps'):
        if getattr(args, key) is None:
            setattr(args, key, pretraining[key])
    torch.manual_seed(args.seed)
    if args.pixels:
        with torch.device('meta'):  # only its patch, tubelet and width
            shape = Encoder(**config)
        return PixelTokens(shape.patch, shape.tubelet, shape.dim, args.seed)
    encoder = Encoder(**config)
    if args.supervised:
        return encoder
    if checkpoint:
        encoder.load_state_dict(checkpoint['ema_encoder' if args.weights == 'ema' else 'encoder'])
    return encoder.eval().requires_grad_(False)


def encode(encoder, clips, layers, chunk, grad=False):
    """clips (B, V, S, 3, F, H, W) -> tokens (B, V, S*N, layers*D): every segment of every view is
    encoded on its own (`chunk` clips per forward) and its N tokens follow in segment order.
    grad: keep the graph (--supervised trains the encoder)."""
    B, V = clips.shape[:2]
    flat = rearrange(clips, 'b v s c f h w -> (b v s) c f h w')
    with torch.set_grad_enabled(grad), autocast(clips.device):
        tokens = torch.cat([encoder(part, last=layers) for part in flat.split(chunk)])  # (B*V*S, N, layers*D)
    return rearrange(tokens, '(b v s) n d -> b v (s n) d', b=B, v=V)


# -----------------------------------------------------------------------------
# features: batches of (tokens (B, V, L, D), labels (B,)) from .epoch(e), len() batches an epoch


class EncodedVideos:
    """`size` videos of a dataset encoded on the fly (--supervised trains on clips: encode_clips moves them),
    `batch_size` a batch. A training set reads items e*size .. (e+1)*size - 1 in epoch e (new crops,
    segment offsets and file order each epoch), others items 0 .. size - 1."""

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


def train_supervised(encoder, train_batches, val_batches, classes, heads, epochs, lr, weight_decay, layers=1, seed=0):
    """--supervised: `encoder` (in train mode) and one AttentiveProbe trained together by AdamW on the
    clips of train_batches, validated after every epoch (the encoder in eval mode) on val_batches, whose
    encode_clips must use this `encoder`. Returns train_probes' record of the probe, with encoder_lr."""
    torch.manual_seed(seed)
    head = AttentiveProbe(encoder.dim * layers, heads, classes).to(next(encoder.parameters()).device)
    # The head's lr is the probe grid's, high so that its one query leaves chance early (see GRID); a ViT
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
        for clips, labels in bar:
            tokens = encode(encoder, clips, layers, chunk=len(clips), grad=True)  # (B, V, L, D)
            correct += train_step(head, optimizer, scheduler, tokens, labels)
            seen += tokens.shape[0] * tokens.shape[1]
        encoder.eval()
        record['train_top1'].append(100 * correct / seen)
        record['val_top1'] += evaluate([head], val_batches)
        bar.write(f"epoch {epoch + 1}: val top-1 {record['val_top1'][-1]:.2f}, train top-1 {record['train_top1'][-1]:.2f}")
    return record


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
    try:  # a bad list or a missing file: its message alone, no traceback
        train_set = make_dataset(args.train or 'synthetic', train=not args.cache, seed=args.seed + 1000, views=1, **common)
        val_set = make_dataset(args.val or 'synthetic', train=False, seed=args.seed + 2000, views=args.views, **common)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f'probe.py: {error}')
    for flag, dataset in (('--train', train_set), ('--val', val_set)):
        if dataset.num_classes == 0:
            raise SystemExit(f'{flag} {getattr(args, flag[2:])} is unlabeled: the probe needs a "path label" list '
                             f'or a folder of image class folders')
    classes = train_set.num_classes
    mode = 'pixels' if args.pixels else 'supervised' if args.supervised else 'frozen'
    if args.supervised and args.train is None and args.train_size is None:
        args.train_size = SUPERVISED_TRAIN_SIZE
        print(f'--supervised: {SUPERVISED_TRAIN_SIZE} synthetic training clips, not {SYNTHETIC_SIZES[0]} (--train_size)')
    args.train_size = args.train_size or (len(train_set) if args.train else SYNTHETIC_SIZES[0])  # as used, in the JSON
    args.val_size = args.val_size or (len(val_set) if args.val else SYNTHETIC_SIZES[1])
    num_workers = args.num_workers if args.num_workers is not None else (8 if device.type == 'cuda' else 0)
    encode_clips = lambda clips: encode(encoder, clips.to(device), args.layers, chunk=args.batch_size)
    # --supervised encodes the clips itself; on synthetic clips, the first train_size every epoch, as cached
    train_batches = EncodedVideos(train_set, args.train_size, args.batch_size,
                                  (lambda clips: clips.to(device)) if args.supervised else encode_clips, classes,
                                  not (args.supervised and args.train is None), num_workers)
    val_batches = EncodedVideos(val_set, args.val_size, max(1, args.batch_size // args.views), encode_clips, classes,
                                False, num_workers)
    source = dict(pixels=f'none: {args.size} tubelets, a fixed random map', supervised=f'{args.size} trained end to end',
                  frozen='random init ' + args.size if args.random_init else f'{args.ckpt} ({args.weights})')[mode]
    print(f'encoder {source}, {encoder.num_params() / 1e6:.1f}M, last {args.layers} block(s) on {device} | '
          f'{args.train or "synthetic " + args.label}: {classes} classes, {args.train_size} train / {args.val_size} '
          f'val videos | {args.segments} segments x {args.views} views of {args.frames} frames at {args.resolution}px')
    if args.supervised:
        history = [train_supervised(encoder, train_batches, val_batches, classes, args.heads, args.epochs, *args.grid[0],
                                    args.layers, args.seed)]
    else:
        if args.cache or args.train is None:
            train_batches, val_batches = cache(train_batches, True, 'train'), cache(val_batches, False, 'val')
        history = train_probes(train_batches, val_batches, dim, classes, args.heads, args.epochs, device, args.grid,
                               args.seed)
    best = max(history, key=lambda record: record['val_top1'][-1])
    for record in history:
        print(f"lr {record['lr']:.0e} wd {record['weight_decay']:g}: train top-1 {record['train_top1'][-1]:.2f}, "
              f"val top-1 {record['val_top1'][-1]:.2f}")
    name = args.label if args.train is None else args.preset
    default = f'probe_{name}.json' if mode == 'frozen' and not args.random_init else \
        f"probe_{'random' if mode == 'frozen' else mode}_{args.size}_{name}.json"
    out = args.out or os.path.join(os.path.dirname(args.ckpt), default)
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    result = dict(mode=mode, top1=best['val_top1'][-1], best_lr=best['lr'], best_weight_decay=best['weight_decay'],
                  probes=history, args=vars(args))
    with open(out, 'w') as f:
        json.dump(result, f, indent=1)
    print(f'wrote {out}')
    print(f"top1: {result['top1']:.2f}")
    return result


if __name__ == '__main__':
    main()
