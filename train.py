"""
Pretrain NExT-Vid: masked, autoregressive next-frame prediction (arXiv 2512.21004, Eq. 9, Table 8).

    python train.py                               # tiny model on built-in synthetic clips, CPU, minutes
    python train.py --resume                      # continue out/ckpt.pt exactly where it stopped
    python train.py --size s --data clips.txt --out_dir out_s
    torchrun --nproc_per_node=8 train.py --size g --grad_checkpointing --compile \\
        --data k400.txt:0.18,ssv2.txt:0.05,imagenet/train:0.25 --out_dir out_g

One step (the objective is nextvid.NextVid): the EMA reference encoder reads the whole clip once
(recoloured at random with --recolour_targets, not in the paper) and gives layer-normed targets;
for each mask generator the encoder reads its copy of the masked clip, the predictor turns the
context into a latent z_t for every token of slots 1..T-1 (aligned to the targets), and the
decoder learns, by flow matching, to generate slot t from z_t, with tau_repeats draws of noise
and time per clip. L = 0.5 * L_flow + 1.0 * L_align. At every save the log gets the reference
features' effective rank and the PSNR of masked next-frame generation on a fixed batch, next to
two baselines (copy the last visible frame; each clip's mean colour).

--target vae --vae W --vae_stats S: the decoder generates a frozen VA-VAE's latents (vae.py; a
posterior sample per clip and step) instead of pixels; the scores decode them. The checkpoint records the paths.
"""
import argparse
import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from copy import deepcopy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import make_dataset
from encoder import SIZES
from masks import parse_masks, sample_keep
from nextvid import RECIPE, NextVid, effective_rank, format_scores, next_frame_scores, recolour
from vae import open_vae

# The four stages of Table 8 as shares of the run (12K, 28K, 80K, 12K of 132K steps):
# (name, share, lr from and to as multiples of --lr, decoder lr as a multiple of --decoder_lr
#  or None = same as the main lr, whether --tau_repeats applies (else 1)). The cool-down also
# reads longer clips (see phases).
STAGES = [
    ('warmup', 12, 0.2, 1.0, None, True),       # 1e-4 -> 5e-4
    ('stable1', 28, 1.0, 0.9, None, True),      # 5e-4 -> 4.5e-4
    ('stable2', 80, 0.9, 0.2, 1.0, False),      # 4.5e-4 -> 1e-4, decoder 8e-4 fixed
    ('cooldown', 12, 0.2, 0.002, 0.375, False),  # 1e-4 -> 1e-6, decoder 3e-4 fixed
]
RUNTIME_FLAGS = {'resume', 'stop_at', 'num_workers', 'log_every', 'save_every', 'eval_steps', 'device', 'compile', 'out_dir'}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--size', choices=list(SIZES), default='tiny')
    p.add_argument('--data', default='synthetic', help="synthetic | list.txt | videos/ | images/ | mix 'a.txt:0.7,imgs/:0.3'")
    p.add_argument('--out_dir', default='out')
    p.add_argument('--steps', type=int, help='optimizer steps; the four stages of Table 8 keep their proportions')
    p.add_argument('--batch_size', type=int, help='global batch in clips (all ranks, all accumulation steps)')
    p.add_argument('--micro_batch_size', type=int, help='clips per rank per forward; accumulation is derived')
    p.add_argument('--lr', type=float, help='peak lr; warm-up starts at 0.2x, cool-down ends at 0.002x (Table 8)')
    p.add_argument('--predictor_lr_scale', type=float, help="the predictor's lr as a multiple of the encoder's (paper: 1)")
    p.add_argument('--decoder_lr', type=float, help='decoder lr in stable 2; 0.375x of it in the cool-down')
    p.add_argument('--frames', type=int, help='frames per clip (2 per slot)')
    p.add_argument('--cooldown_frames', type=int, help='frames per clip in the cool-down, the batch shrunk to match (paper: 64)')
    p.add_argument('--resolution', type=int)
    p.add_argument('--fps', type=float, help='frame rate sampled from videos')
    p.add_argument('--distractors', type=int, default=2, help='synthetic clips: extra moving objects per training clip')
    p.add_argument('--camera_motion', type=float, default=0.0, help='synthetic clips: background pan, px per frame at 64 px')
    p.add_argument('--target', choices=['pixel', 'vae'], default='pixel', help="the decoder's target: pixels, or the "
                   "latents of the frozen VA-VAE in --vae (needs --vae_stats)")
    p.add_argument('--vae', help='--target vae: VA-VAE weights (vavae-imagenet256-f16d32-dinov2.pt)')
    p.add_argument('--vae_stats', help='--target vae: its latent statistics (latents_stats.pt)')
    p.add_argument('--masks', help="mask generators as blocks x scale, e.g. '8x0.15,2x0.7' (Table 8)")
    p.add_argument('--no_mask', action='store_true', help='the encoder sees the whole clip (Table 4 ablation)')
    p.add_argument('--predictor_depth', type=int, help='cross-attention blocks of the predictor (Table 7: 12)')
    p.add_argument('--tau_repeats', type=int, help='noise/time draws per clip in the first two stages, then 1')
    p.add_argument('--ema', type=float, help='momentum of the reference encoder; 0 = the online encoder itself')
    p.add_argument('--recolour_targets', action=argparse.BooleanOptionalAction, help='the reference encoder reads each '
                   'clip with its colour channels permuted and negated at random')
    p.add_argument('--prediction', choices=['x', 'v'], help='the decoder outputs the clean target (x, JiT) or the velocity (v)')
    p.add_argument('--tau_sampling', choices=['uniform', 'logit_normal'], help='flow times: U(0, 1), or sigmoid(N(-0.8, 0.8))')
    p.add_argument('--flow_weight', type=float, help='weight of L_flow (Eq. 9: 0.5)')
    p.add_argument('--align_weight', type=float, help='weight of L_align (Eq. 9: 1.0)')
    p.add_argument('--previous_slot', action=argparse.BooleanOptionalAction, help='queries start from their position a slot earlier')
    p.add_argument('--reference_condition', type=float, help="share of decoder inputs that read c'_t, not z_t (paper: 0)")
    p.add_argument('--dtype', choices=['fp32', 'bf16'], help='autocast precision (default: bf16 on GPU, fp32 on CPU)')
    p.add_argument('--compile', action='store_true', help='torch.compile every transformer block')
    p.add_argument('--grad_checkpointing', action='store_true', help='recompute encoder and decoder blocks in backward')
    p.add_argument('--resume', action='store_true', help='continue from out_dir/ckpt.pt with its recipe')
    p.add_argument('--stop_at', type=int, help='save and stop at this step (split a run over jobs; --resume continues)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--num_workers', type=int, help='data loader processes per rank (default: 0 on CPU, 8 on GPU)')
    p.add_argument('--log_every', type=int, default=10)
    p.add_argument('--eval_steps', type=int, default=50, help="Euler steps of the next-frame score at every save (as sample.py)")
    p.add_argument('--save_every', type=int, default=200)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args(argv)
    given = {k for k, v in vars(args).items() if v != p.get_default(k)}  # flags set on the command line
    sources = {part.split(':')[0].strip() for part in args.data.split(',')}
    if given & {'distractors', 'camera_motion'} and 'synthetic' not in sources:
        p.error('--distractors and --camera_motion change the built-in synthetic clips; --data has none')
    for key, value in RECIPE[args.size].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args, given


# -----------------------------------------------------------------------------
# the objective


def schedule(step, args):
    """Stage, learning rates and tau repeats at `step` of the four-stage recipe."""
    total = sum(s[1] for s in STAGES)
    end = 0
    for name, share, lr_from, lr_to, decoder, repeats in STAGES:
        start, end = end, end + share * args.steps / total
        if step < end or name == 'cooldown':
            frac = min(max((step - start) / max(end - start, 1), 0.0), 1.0)
            lr = args.lr * (lr_from + (lr_to - lr_from) * frac)
            return dict(stage=name, lr=lr, decoder_lr=lr if decoder is None else decoder * args.decoder_lr,
                        tau_repeats=args.tau_repeats if repeats else 1, start=math.ceil(start))


# -----------------------------------------------------------------------------
# data order: every sample has a global number, so ranks split the data and resume is exact


class StepSampler(torch.utils.data.Sampler):
    """Dataset indices for steps [first, last) on one rank: for step s the global batch is
    samples offset + (s - first)*batch .. + batch, and rank r reads its contiguous share."""

    def __init__(self, first, last, offset, batch, rank, world):
        self.first, self.last, self.offset, self.batch, self.rank, self.world = first, last, offset, batch, rank, world

    def __iter__(self):
        share = self.batch // self.world
        for s in range(self.first, self.last):
            base = self.offset + (s - self.first) * self.batch + self.rank * share
            yield from range(base, base + share)

    def __len__(self):
        return (self.last - self.first) * (self.batch // self.world)


def make_loader(args, frames, batch, micro, first, last, offset, rank, world):
    dataset = make_dataset(args.data, frames=frames, resolution=args.resolution, fps=args.fps, train=True, seed=args.seed,
                           distractors=args.distractors, camera_motion=args.camera_motion)
    sampler = StepSampler(first, last, offset, batch, rank, world)
    return torch.utils.data.DataLoader(dataset, batch_size=micro, sampler=sampler, num_workers=args.num_workers,
                                       pin_memory=args.device.startswith("cuda"))


# -----------------------------------------------------------------------------
# checkpoints, log and plot


def save_checkpoint(path, model, ema, optimizer, step, args):
    """Raw modules (never the DDP wrapper), optimizer, step and recipe. The RNG state is
    (seed, step): train() reseeds from them at every step, on every rank."""
    state = dict(encoder=model.encoder.state_dict(), ema_encoder=ema.state_dict(), predictor=model.predictor.state_dict(),
                 decoder=model.decoder.state_dict(), optimizer=optimizer.state_dict(), step=step, args=vars(args),
                 encoder_config=dict(SIZES[args.size]))
    torch.save(state, path + '.tmp')
    os.replace(path + '.tmp', path)  # atomic: a crash never leaves half a checkpoint


def plot_losses(log_path, png_path, width=640, height=360, margin=40):
    """A loss curve (total, flow, align against step) drawn with pillow."""
    rows = [r for r in map(json.loads, open(log_path)) if 'loss' in r]
    if len(rows) < 2:
        return
    image = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(image)
    steps = [r['step'] for r in rows]
    top = max(max(r['loss'], r['flow'], r['align']) for r in rows)
    x = lambda s: margin + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (width - 2 * margin)
    y = lambda v: height - margin - v / top * (height - 2 * margin)
    draw.rectangle([margin, margin, width - margin, height - margin], outline='gray')
    for i, (key, colour) in enumerate([('loss', 'black'), ('flow', 'blue'), ('align', 'red')]):
        draw.line([(x(r['step']), y(r[key])) for r in rows], fill=colour, width=2)
        draw.text((width - margin - 60, margin + 5 + 12 * i), key, fill=colour)
    draw.text((margin, height - margin + 8), f"step {steps[0]}", fill='black')
    draw.text((width - margin - 70, height - margin + 8), f"step {steps[-1]}", fill='black')
    draw.text((margin + 4, margin + 4), f"{top:.3f}", fill='black')
    draw.text((margin + 4, height - margin - 14), "0", fill='black')
    image.save(png_path)


# -----------------------------------------------------------------------------
# training


def check_data(args):
    """The --data spec and every file it lists, checked before anything is built (at g on 8 GPUs,
    minutes): a bad spec or a missing file exits with its message alone, on every rank."""
    try:
        make_dataset(args.data, frames=args.frames, resolution=args.resolution, fps=args.fps, train=True, seed=args.seed,
                     distractors=args.distractors, camera_motion=args.camera_motion)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"--data {args.data}: {error}")


def setup_distributed(args):
    """DDP from torchrun's environment: nccl on CUDA, gloo on CPU. Returns (rank, world)."""
    if int(os.environ.get('RANK', -1)) == -1:
        return 0, 1
    rank, world, local = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ['LOCAL_RANK'])
    if args.device.startswith('cuda'):
        args.device = f'cuda:{local}'
        torch.cuda.set_device(args.device)
    dist.init_process_group('nccl' if args.device.startswith('cuda') else 'gloo')
    return rank, world


def load_resume(args, given):
    """The checkpoint to continue; its recipe wins, and a flag that would change it is an error."""
    path = os.path.join(args.out_dir, 'ckpt.pt')
    if not os.path.exists(path):
        raise SystemExit(f"--resume: no checkpoint at {path}")
    checkpoint = torch.load(path, map_location='cpu', weights_only=False)
    for key, value in checkpoint['args'].items():
        if key in RUNTIME_FLAGS:
            continue
        if key in given and getattr(args, key) != value:
            raise SystemExit(f"--{key} {getattr(args, key)} differs from the checkpoint's {value}: a resumed run keeps its recipe")
        setattr(args, key, value)
    return checkpoint


def phases(args, world, derive_micro=False):
    """(first step, last step, frames, global batch, micro batch) before and in the cool-down. With
    derive_micro (no --micro_batch_size given), each phase takes the largest micro-batch up to the
    recipe's that splits its batch evenly over the ranks."""
    factor = args.cooldown_frames / args.frames
    cool = (args.cooldown_frames, int(args.batch_size / factor), max(1, int(args.micro_batch_size / factor)))
    result = []
    for frames, batch, micro in [(args.frames, args.batch_size, args.micro_batch_size), cool]:
        if derive_micro and batch % world == 0:
            micro = max(m for m in range(1, micro + 1) if (batch // world) % m == 0)
        if batch < 1 or batch % (micro * world):
            raise SystemExit(f"batch of {batch} clips does not divide into micro-batches of {micro} on {world} "
                             f"rank(s) (frames {frames}); choose --batch_size a multiple of micro_batch_size x ranks")
        result.append([frames, batch, micro])
    cooldown_start = schedule(args.steps - 1, args)['start']
    return [(0, cooldown_start, *result[0]), (cooldown_start, args.steps, *result[1])]


def train(argv=None):
    args, given = get_args(argv)
    rank, world = setup_distributed(args)
    master = rank == 0
    checkpoint = load_resume(args, given) if args.resume else None
    check_data(args)
    vae = open_vae(args.target, args.vae, args.vae_stats, SIZES[args.size].get('patch', 16))  # before the models
    if args.num_workers is None:
        args.num_workers = 8 if args.device.startswith('cuda') else 0
    args.dtype = args.dtype or ('bf16' if args.device.startswith('cuda') else 'fp32')
    masks = parse_masks(args.masks)
    plan = phases(args, world, derive_micro='micro_batch_size' not in given)
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, torch.bfloat16) if args.dtype == 'bf16' else nullcontext()

    torch.manual_seed(args.seed)
    model = NextVid.build(**{**vars(args), 'vae': vae.to(device) if vae else None}).to(device)  # the VAE is no submodule
    encoder, predictor, decoder = model.encoder, model.predictor, model.decoder
    ema = deepcopy(encoder).eval().requires_grad_(False)  # the reference encoder, synced at start
    optimizer = torch.optim.AdamW(model.param_groups(), lr=args.lr, betas=(0.9, 0.95), fused=device.type == 'cuda')
    start = 0
    if checkpoint:
        for name in ('encoder', 'predictor', 'decoder'):
            getattr(model, name).load_state_dict(checkpoint[name])
        ema.load_state_dict(checkpoint['ema_encoder'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        start = checkpoint['step']
        del checkpoint
    encoder.grad_checkpointing = decoder.grad_checkpointing = args.grad_checkpointing
    if args.compile:
        # Static shapes: each mask generator keeps a fixed count (masks.kept_count), so Block.forward compiles
        # one graph per length (reference, each generator's online and context), again for the cool-down, no more.
        torch._dynamo.config.recompile_limit = 16
        for block in [*encoder.blocks, *predictor.blocks, *decoder.blocks, *ema.blocks]:
            block.compile(dynamic=False)  # in place: state_dict keys stay those of the raw modules
    trained = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None) if world > 1 else model
    ema_params, online_params = list(ema.parameters()), list(encoder.parameters())

    end = min(args.steps, args.stop_at or args.steps)
    ckpt_path, log_path = os.path.join(args.out_dir, 'ckpt.pt'), os.path.join(args.out_dir, 'log.jsonl')
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        print(f"encoder {args.size}: {encoder.num_params() / 1e6:.1f}M, predictor {predictor.num_params() / 1e6:.1f}M, "
              f"decoder {decoder.num_params() / 1e6:.1f}M | {world} rank(s) on {device}, {args.dtype} | "
              f"steps {start} -> {end} of {args.steps}")
        fixed = make_dataset(args.data, frames=args.frames, resolution=args.resolution, fps=args.fps, train=False, seed=args.seed + 1)
        fixed = torch.stack([fixed[i][0] for i in range(32)])  # evaluate()'s clips: one set per seed, whatever --distractors / --camera_motion

    def evaluate(step):  # on the fixed batch: the reference features' effective rank, next-frame generation's PSNR
        with torch.no_grad(), autocast:
            features = torch.cat([ema(chunk.to(device)).mean(1) for chunk in fixed.split(args.micro_batch_size)])
            keep = None if args.no_mask else sample_keep(len(fixed), encoder.grid(fixed), *masks[0],
                                                         generator=torch.Generator().manual_seed(args.seed)).to(device)
            scores = next_frame_scores(encoder, predictor, decoder, fixed.to(device), keep, args.eval_steps,
                                       generator=torch.Generator().manual_seed(args.seed), chunk=args.micro_batch_size,
                                       vae=model.vae)
        rank_now = effective_rank(features)
        tqdm.write(f"step {step} | effective rank of reference features {rank_now:.2f} | {format_scores(scores)}")
        row = dict(step=step, effective_rank=rank_now)
        for name, (all_pixels, masked) in scores.items():
            key = 'psnr_' + name.replace(' ', '_')
            row[key], row[key + '_masked'] = all_pixels, masked
        with open(log_path, 'a') as f:
            f.write(json.dumps(row) + '\n')

    if master and start == 0:
        open(log_path, 'w').close()  # a fresh run starts a fresh log; --resume appends to its own
        evaluate(0)
    bar = tqdm(total=end, initial=start, disable=not master, dynamic_ncols=True)
    failures, clock, clips = 0, time.time(), 0
    for first, last, frames, batch, micro in plan:
        if max(first, start) >= min(last, end):
            continue
        begin = max(first, start)
        samples_before = plan[0][3] * min(begin, plan[1][0]) + plan[1][3] * max(begin - plan[1][0], 0)
        loader = iter(make_loader(args, frames, batch, micro, begin, min(last, end), samples_before, rank, world))
        accum = batch // (micro * world)
        for step in range(begin, min(last, end)):
            now = schedule(step, args)
            for group in optimizer.param_groups:
                scale = args.predictor_lr_scale if group['name'] == 'predictor' else 1.0
                group['lr'] = now['decoder_lr'] if group['name'] == 'decoder' else now['lr'] * scale
            # RNG state is a function of (seed, step, rank), so a resumed run draws what an uninterrupted one would
            torch.manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
            mask_rng = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + rank + 1)
            flow_sum = align_sum = 0.0
            for micro_step in range(accum):
                video = next(loader)[0].to(device, non_blocking=True)  # (b, 3, F, H, W)
                with torch.no_grad(), autocast:
                    target = ema(recolour(video) if args.recolour_targets else video).float()
                    target = F.layer_norm(target, target.shape[-1:])  # (b, N, D), parameter-free
                grid = encoder.grid(video)
                keeps = [None] if args.no_mask else [sample_keep(len(video), grid, n, s, generator=mask_rng).to(device)
                                                     for n, s in masks]
                sync = world == 1 or micro_step == accum - 1
                with (nullcontext() if sync else trained.no_sync()), autocast:
                    flow, align = trained(video, target, keeps, now['tau_repeats'])
                    loss = (args.flow_weight * flow + args.align_weight * align) / accum
                loss.backward()
                flow_sum, align_sum = flow_sum + flow.detach() / accum, align_sum + align.detach() / accum
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if not torch.isfinite(grad_norm):  # NaN or inf: the same on every rank, grads are all-reduced
                optimizer.zero_grad(set_to_none=True)
                failures += 1
                warnings.warn(f"step {step}: non-finite loss or gradient, step skipped ({failures} in a row)")
                if failures >= 3:
                    raise RuntimeError(f"{failures} non-finite steps in a row at step {step}: lower --lr or check the data")
                continue
            failures = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, online_params, 1 - args.ema)
            clips += batch
            bar.update(1)

            done = step + 1
            if done % args.log_every == 0 or done == end:
                metrics = torch.stack([flow_sum, align_sum])
                if world > 1:
                    dist.all_reduce(metrics, op=dist.ReduceOp.AVG)
                flow_v, align_v = metrics.tolist()
                speed, clock, clips = clips / (time.time() - clock), time.time(), 0
                row = dict(step=done, stage=now['stage'], loss=args.flow_weight * flow_v + args.align_weight * align_v, flow=flow_v, align=align_v,
                           lr=now['lr'], decoder_lr=now['decoder_lr'], grad_norm=grad_norm.item(), clips_per_s=speed)
                if master:
                    bar.write(' | '.join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
                    with open(log_path, 'a') as f:
                        f.write(json.dumps(row) + '\n')
            if master and (done % args.save_every == 0 or done == end):
                save_checkpoint(ckpt_path, model, ema, optimizer, done, args)
                evaluate(done)
                tqdm.write(f"step {done} | saved {ckpt_path}")
    bar.close()
    if master:
        if end < args.steps:
            print(f"stopped at step {end} of {args.steps}; continue with: python train.py --resume --out_dir {args.out_dir}")
        else:
            plot_losses(log_path, os.path.join(args.out_dir, 'loss.png'))
            print(f"done: {args.steps} steps; checkpoint {ckpt_path}, log {log_path}, curve {args.out_dir}/loss.png")
    if world > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    train()
