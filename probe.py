"""
Attentive probe on a frozen NExT-Vid encoder (DESIGN.md, Table 10).

    python probe.py --ckpt out/encoder.pt               # synthetic clips, direction of motion, CPU minutes
    python probe.py --ckpt out/ckpt.pt --label shape    # a full checkpoint works too; the appearance label
    python probe.py --random_init --size tiny           # a random encoder: the baseline for every result
    python probe.py --pixels --size tiny --label shape      # the floor: no encoder, raw tubelets
    python probe.py --supervised --size tiny --label shape  # the ceiling: the encoder trained on the labels
    torchrun --nproc_per_node=8 probe.py --ckpt out_l/encoder.pt --preset k400 --train k400/train.txt --val k400/val.txt
    python probe.py --ckpt out/encoder.pt --eval_only   # the saved heads on the validation clips again (--val: a list)

--ckpt takes an encoder file (out/encoder.pt) or a train.py checkpoint (checkpoints.load_encoder).
A video gives `segments` clips spread over its length; each is encoded on its own and their tokens
are concatenated along the token axis. The probe (one learnable query cross-attending to the tokens,
an MLP, a linear classifier) trains on one view per video with the training augmentation; validation
averages its softmax over `views` spatial crops. One head per (lr, weight decay) of the preset's grid
trains on the same features (the encoder runs once per batch). The reported top-1 is the best head's
at the last epoch, chosen on the validation set it is measured on (no held-out split; --eval_only
--val other.txt measures the chosen head on another list). Without augmentation (synthetic clips, or
--cache) features are computed once and kept in memory, so epochs only run the heads. Prints
`top1: <percent> ...` last and writes every head's curves, the arguments and the mode (frozen,
pixels or supervised) to a JSON file (--out, default next to the checkpoint).

Under torchrun (or srun) the ranks split every batch, each encodes its own share (and caches it with
--cache), and the heads' gradients are summed over the ranks: N ranks train the heads one process
would (attentive_probe.py). Only rank 0 prints and writes. After every epoch the heads, their
optimizers, the grid, the chosen (lr, wd) and the accuracies go to the probe file (--out's name with
.pt); the same command again continues from its last finished epoch, on any number of ranks (a
requeued job just works), and stops if its settings differ. --stop_at E stops after epoch E.
Precision: bf16 autocast on GPUs and on CPUs with native bf16, except that the synthetic preset
stays fp32 on a CPU, where its figures were fixed (--dtype).

--pixels, the floor: no encoder; each 2 x p x p x 3 tubelet (p: the checkpoint's patch, or --size's)
through one fixed random linear map (seeded) to the encoder's width, tokens shaped as the encoder's.
--supervised, the ceiling at this budget: that architecture from random init (seeded) trained end to
end with one probe (AdamW, the grid's first lr and weight decay, a tenth of that lr for the encoder),
validated as above after every epoch, in one process, nothing kept but the JSON. A backward pass per
clip per epoch is slow, so on synthetic clips it trains on the first SUPERVISED_TRAIN_SIZE (1000) of
the frozen probe's 4000 unless --train_size.
"""
import argparse
import json
import math
import os

import torch
import torch.distributed as dist

from attentive_probe import EncodedVideos, PixelTokens, ProbeGrid, cache, encode, evaluate, train_probes, train_supervised
from checkpoints import atomic_save, load_encoder
from data import make_dataset
from encoder import SIZES, Encoder
from nextvid import RECIPE
from runtime import StopSignal, default_dtype, setup_distributed

# Table 10 (DESIGN.md), and `synthetic` sized for a CPU (the tiny encoder at 8 x 64 x 64 in a few minutes).
# frames / fps None: the values the encoder was pretrained with; resolution is always the encoder's.
# The presets' segments x views, frames and fps, batch, epochs and layers are Table 10's. They differ from
# the paper's protocol in: the (lr, weight decay) grid, which is this project's (Table 10 as DESIGN.md
# records it names none; V-JEPA 2 trains 20 heads, lr 1e-4 .. 5e-3 x wd 0.01 .. 0.8): a one-query probe
# sits at chance for hundreds of steps before its attention finds the object (measured on the synthetic
# clips: lr 1e-3 needs 20 epochs to leave chance, 1e-2 half that), hence the high lrs; and the training
# augmentation, a random resized crop (scale 0.3 - 1) without V-JEPA 2's RandAugment and random erasing.
# flip: whether training views may be mirrored. V-JEPA 2's frozen video evaluation never flips (every
# video task); SSv2's labels name directions ("pushing something from left to right"), and K400 and
# Diving48 follow V-JEPA 2 too. IN1K's labels do not depend on left and right and V-JEPA 2's image probe
# flips (timm's training transform), so it does. Synthetic clips are never mirrored (a label can be a
# direction) and are not cropped.
GRID = [(lr, wd) for lr in (1e-2, 3e-3, 1e-3) for wd in (0.01, 0.1)]
PRESETS = {
    'synthetic': dict(segments=1, views=1, frames=None, fps=None, batch_size=64, epochs=20, layers=1, flip=False,
                      grid=[(1e-2, 0.01), (3e-3, 0.01)]),
    'k400': dict(segments=8, views=3, frames=16, fps=4.0, batch_size=192, epochs=20, layers=1, flip=False, grid=GRID),
    'in1k': dict(segments=1, views=1, frames=16, fps=None, batch_size=384, epochs=20, layers=1, flip=True,
                 grid=GRID),  # image repeated
    'ssv2': dict(segments=2, views=3, frames=16, fps=4.0, batch_size=96, epochs=20, layers=1, flip=False, grid=GRID),
    'diving48': dict(segments=4, views=3, frames=32, fps=2.0, batch_size=48, epochs=100, layers=4, flip=False, grid=GRID),
}
# Synthetic probe clips: train and validation clips, and one object each (no distractors), so that
# the label names the only moving thing (with distractors even a random encoder's probe is at chance).
SYNTHETIC_SIZES = (4000, 1000)
SUPERVISED_TRAIN_SIZE = 1000  # --supervised's synthetic training clips (the first of the frozen probe's 4000)
SELECTION = ('the head of the (lr, weight decay) grid with the best validation top-1 at the last epoch, '
             'chosen on the validation set it is measured on (no held-out split)')
RUNTIME = {'num_workers', 'device', 'out', 'eval_only', 'stop_at'}  # flags that leave a probe's result as it is
EVAL_FLAGS = {'train', 'val', 'train_size', 'val_size', 'batch_size', 'dtype'}  # --eval_only may change these


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ckpt', default='out/ckpt.pt', help='an encoder file (out/encoder.pt) or a train.py checkpoint')
    p.add_argument('--weights', choices=['ema', 'online'], default='ema',
                   help="which encoder: the EMA reference (an encoder file's only one) or a checkpoint's online one")
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
    p.add_argument('--batch_size', type=int, help='videos per training batch, over all ranks (validation: batch_size // views)')
    p.add_argument('--epochs', type=int)
    p.add_argument('--layers', type=int, help='features: the last N encoder blocks, concatenated on channels')
    p.add_argument('--heads', type=int, default=16, help='heads of the probe cross-attention')
    p.add_argument('--cache', action='store_true', help='no training augmentation: encode every video once and keep '
                   'the features in memory, each rank its share (always so for synthetic clips)')
    p.add_argument('--dtype', choices=['fp32', 'bf16'], help='autocast precision (default: bf16 on GPU and on CPUs with '
                   'native bf16, fp32 elsewhere and for the synthetic preset on a CPU)')
    p.add_argument('--eval_only', action='store_true', help="evaluate the probe file's heads (same command, same --out) "
                   'on --val, default the validation data they were trained with; nothing is written')
    p.add_argument('--stop_at', type=int, help='stop after this epoch (the same command continues)')
    p.add_argument('--num_workers', type=int, help='data loader processes (default: 0 on CPU, 8 on GPU)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--out', help='JSON results, the probe file beside it with .pt (default: probe_<label or preset>.json '
                   'next to the checkpoint, probe_<random, pixels or supervised>_<size>_<label or preset>.json for those modes)')
    args = p.parse_args(argv)
    if args.size and not (args.random_init or args.pixels or args.supervised):
        p.error('--size is for --random_init, --pixels and --supervised; a checkpoint knows its own size')
    if args.pixels:
        if (args.layers or 1) > 1:
            p.error('--pixels has one "layer" (the tubelets): --layers must be 1')
        args.layers = 1  # also over a preset's
    if (args.train is None) != (args.val is None) and not args.eval_only:
        p.error('give both --train and --val, or neither for synthetic clips')
    if args.supervised and (args.eval_only or args.stop_at):
        p.error('--supervised keeps no probe file: no --eval_only or --stop_at')
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def build_encoder(args):
    """The encoder of --ckpt (checkpoints.load_encoder), or for --random_init or --size that size's
    (default tiny) at random init, frozen in eval mode; for --pixels a PixelTokens of its patch and width
    instead; for --supervised its architecture at random init, trainable. Fills args.size, and frames,
    resolution and fps not given, from its pretraining."""
    loaded = None
    if args.random_init or args.size:
        args.size = args.size or 'tiny'
        config, pretraining = SIZES[args.size], RECIPE[args.size]  # what train.py would pretrain that size with
    else:
        try:
            loaded, pretraining = load_encoder(args.ckpt, args.weights)
        except FileNotFoundError as error:
            raise SystemExit(f'{error}, or probe a random encoder with --random_init --size tiny')
        except ValueError as error:
            raise SystemExit(str(error))
        config, args.size = loaded.config, pretraining['size']
    for key in ('frames', 'resolution', 'fps'):
        if getattr(args, key) is None:
            setattr(args, key, pretraining[key])
    torch.manual_seed(args.seed)
    if args.pixels:
        if loaded is None:
            with torch.device('meta'):  # only its patch, tubelet and width
                loaded = Encoder(**config)
        return PixelTokens(loaded.patch, loaded.tubelet, loaded.dim, args.seed)
    if args.supervised:
        return Encoder(**config)
    return loaded if loaded is not None else Encoder(**config).eval().requires_grad_(False)


def make_datasets(args):
    """(training set, or None with --eval_only; validation set), and the sizes not given."""
    # synthetic clips: seeds apart from train.py's (0 and 1), so no probe clip was a pretraining clip
    common = dict(frames=args.frames, resolution=args.resolution, fps=args.fps, segments=args.segments, label=args.label,
                  distractors=0)
    try:  # a bad list or a missing file: its message alone, no traceback
        train_set = None if args.eval_only else make_dataset(args.train or 'synthetic', train=not args.cache,
                                                             seed=args.seed + 1000, views=1, flip=args.flip, **common)
        val_set = make_dataset(args.val or 'synthetic', train=False, seed=args.seed + 2000, views=args.views, **common)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f'probe.py: {error}')
    for flag, dataset in (('--train', train_set), ('--val', val_set)):
        if dataset is not None and dataset.num_classes == 0:
            raise SystemExit(f'{flag} {getattr(args, flag[2:])} is unlabeled: the probe needs a "path label" list '
                             f'or a folder of image class folders')
    if args.supervised and args.train is None and args.train_size is None:
        args.train_size = SUPERVISED_TRAIN_SIZE
        print(f'--supervised: {SUPERVISED_TRAIN_SIZE} synthetic training clips, not {SYNTHETIC_SIZES[0]} (--train_size)')
    args.train_size = args.train_size or (len(train_set) if args.train else SYNTHETIC_SIZES[0])  # as used, in the JSON
    args.val_size = args.val_size or (len(val_set) if args.val else SYNTHETIC_SIZES[1])
    return train_set, val_set


def summary(history, mode, args):
    """The JSON's contents: the heads' curves and the chosen head (SELECTION)."""
    best = max(range(len(history)), key=lambda i: history[i]['val_top1'][-1])
    return dict(mode=mode, val_top1_best_of_grid=history[best]['val_top1'][-1], selection=SELECTION, best_head=best,
                best_lr=history[best]['lr'], best_weight_decay=history[best]['weight_decay'],
                epochs_done=len(history[0]['val_top1']), probes=history, args=vars(args))


def main(argv=None):
    args = get_args(argv)
    rank, world, device = setup_distributed(args.device)
    try:
        if world > 1 and args.supervised:
            raise SystemExit('--supervised trains the encoder in one process: run it without torchrun')
        return run(args, rank == 0, world, torch.device(device))
    except SystemExit as stop:
        if rank > 0 and isinstance(stop.code, str):
            raise SystemExit(1) from None  # rank 0 alone says why
        raise
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(args, master, world, device):
    say = print if master else lambda *_: None
    encoder = build_encoder(args).to(device)
    args.dtype = args.dtype or ('fp32' if args.preset == 'synthetic' and device.type == 'cpu' else default_dtype(device))
    dim = encoder.dim * args.layers
    if dim % args.heads:
        raise SystemExit(f'--heads {args.heads} does not divide the feature width {dim} ({args.layers} x {encoder.dim})')
    mode = 'pixels' if args.pixels else 'supervised' if args.supervised else 'frozen'
    name = args.label if args.train is None else args.preset
    default = f'probe_{name}.json' if mode == 'frozen' and not args.random_init else \
        f"probe_{'random' if mode == 'frozen' else mode}_{args.size}_{name}.json"
    args.out = args.out or os.path.join(os.path.dirname(args.ckpt), default)
    probe_path = os.path.splitext(args.out)[0] + '.pt'
    saved = torch.load(probe_path, map_location='cpu', weights_only=True) if os.path.isfile(probe_path) else None
    if args.eval_only:
        if saved is None:
            raise SystemExit(f'--eval_only: no probe file at {probe_path}: train the probe first (the same --out)')
        args.train, args.train_size = saved['args']['train'], saved['args']['train_size']
        if args.val is None:
            args.val, args.val_size = saved['args']['val'], args.val_size or saved['args']['val_size']
    train_set, val_set = make_datasets(args)
    if saved and not args.supervised:
        ignored = RUNTIME | (EVAL_FLAGS if args.eval_only else set())
        changed = [f"--{key} {value} (the probe's: {saved['args'].get(key)})" for key, value in vars(args).items()
                   if key not in ignored and saved['args'].get(key) != value]
        if changed:
            raise SystemExit(f'{probe_path} holds a probe with other settings: {", ".join(changed)}. Give another --out, '
                             f'or delete it to start over')
    classes = saved['classes'] if args.eval_only else train_set.num_classes
    num_workers = args.num_workers if args.num_workers is not None else (8 if device.type == 'cuda' else 0)
    encode_clips = lambda clips: encode(encoder, clips.to(device), args.layers, args.batch_size, args.dtype)
    val_batches = EncodedVideos(val_set, args.val_size, max(1, args.batch_size // args.views), encode_clips, classes,
                                False, num_workers)
    source = dict(pixels=f'none: {args.size} tubelets, a fixed random map', supervised=f'{args.size} trained end to end',
                  frozen='random init ' + args.size if args.random_init else f'{args.ckpt} ({args.weights})')[mode]
    say(f'encoder {source}, {encoder.num_params() / 1e6:.1f}M, last {args.layers} block(s) | {world} rank(s) on '
        f'{device}, {args.dtype} | {args.train or "synthetic " + args.label}: {classes} classes, {args.train_size} train '
        f'/ {args.val_size} val videos | {args.segments} segments x {args.views} views of {args.frames} frames at '
        f'{args.resolution}px')
    if master:
        os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    if not args.supervised:
        heads = ProbeGrid(args.grid, dim, args.heads, classes, args.epochs * math.ceil(args.train_size / args.batch_size),
                          device, args.seed)
        if saved:
            heads.load_state_dict(saved['heads'])
    if args.eval_only:
        val_top1, counted = evaluate(heads.probes, val_batches, args.dtype)
        chosen = saved['best_head']
        for (lr, wd), top1 in zip(args.grid, val_top1):
            say(f'lr {lr:.0e} wd {wd:g}: val top-1 {top1:.2f}')
        say(f"top1: {val_top1[chosen]:.2f} on {counted} videos of {args.val or 'synthetic clips'} (the head chosen on "
            f"{saved['args']['val'] or 'synthetic clips'} in training: lr {saved['best_lr']:.0e} "
            f"wd {saved['best_weight_decay']:g})")
        return dict(val_top1=val_top1, top1_of_chosen_head=val_top1[chosen], val_videos=counted)

    # --supervised encodes the clips itself; on synthetic clips, the first train_size every epoch, as cached
    train_batches = EncodedVideos(train_set, args.train_size, args.batch_size,
                                  (lambda clips: clips.to(device)) if args.supervised else encode_clips, classes,
                                  not (args.supervised and args.train is None), num_workers)
    if args.supervised:
        history = [train_supervised(encoder, train_batches, val_batches, classes, args.heads, args.epochs, *args.grid[0],
                                    args.layers, args.seed, args.dtype)]
    else:
        history = saved['probes'] if saved else None
        done = len(history[0]['val_top1']) if history else 0
        if (args.cache or args.train is None) and done < args.epochs:
            train_batches, val_batches = cache(train_batches, True, 'train'), cache(val_batches, False, 'val')

        def keep(history):  # after every epoch
            if master:
                atomic_save(dict(summary(history, mode, args), heads=heads.state_dict(), classes=classes), probe_path)

        stop, end = StopSignal(world), min(args.epochs, args.stop_at or args.epochs)
        try:
            history = train_probes(train_batches, val_batches, heads, end, args.dtype, history, keep,
                                   lambda: stop.requested(device))
        finally:
            stop.restore()
        done = len(history[0]['val_top1'])
        if done < args.epochs:
            say(f'stopped after epoch {done} of {args.epochs}: {probe_path} keeps it; the same command continues')
            if done < end:  # by a signal, in the middle of an epoch: train.py's status, for a requeue
                raise SystemExit(143)
            return None
    result = summary(history, mode, args)
    for record in history:
        say(f"lr {record['lr']:.0e} wd {record['weight_decay']:g}: train top-1 {record['train_top1'][-1]:.2f}, "
            f"val top-1 {record['val_top1'][-1]:.2f}")
    if master:
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=1)
    say(f'wrote {args.out}' + ('' if args.supervised else f' and the heads to {probe_path}'))
    say(f"top1: {result['val_top1_best_of_grid']:.2f} (the best of {len(history)} head(s), one per (lr, weight decay), "
        f"chosen on the validation set it is measured on: lr {result['best_lr']:.0e} wd {result['best_weight_decay']:g})")
    return result


if __name__ == '__main__':
    main()
