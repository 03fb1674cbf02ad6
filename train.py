"""
Pretrain NExT-Vid: masked, autoregressive next-frame prediction (arXiv 2512.21004, Eq. 9, Table 8).

    python train.py                               # tiny model on built-in synthetic clips, CPU, minutes
    python train.py --size s --data clips.csv --val val.csv --out_dir out_s
    torchrun --standalone --nproc_per_node=8 train.py --size g --data k400.csv:0.18,ssv2.csv:0.05,imagenet/train:0.25 --out_dir out_g
    srun python train.py --size g --data mix.csv --out_dir out_g   # under SLURM (README: an sbatch script with requeue)

The same command again continues the run in --out_dir (a requeued job just works); a command whose
recipe differs from the run there stops and says so. SIGTERM or Ctrl-C: the step in flight finishes,
a checkpoint is saved, and the process exits with status 143. out_dir/config.json holds every
resolved setting; out_dir/encoder.pt the encoder alone (checkpoints.py).

One step (the objective is nextvid.NextVid): the EMA reference encoder reads the whole clip once
and gives layer-normed targets; for each mask generator the encoder reads its copy of the masked
clip, the predictor turns the context into a latent z_t for every token of slots 1..T-1 (aligned to
the targets), and the decoder learns, by flow matching, to generate slot t from z_t, with
tau_repeats draws of noise and time per clip. L = 0.5 * L_flow + 1.0 * L_align. At every save the
log gets the reference features' effective rank and the PSNR of masked next-frame generation on a
fixed batch, next to two baselines (copy the last visible frame; each clip's mean colour).
"""
import argparse
import json
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

from checkpoints import save_checkpoint, save_encoder
from data import StepSampler, make_dataset, read_counts
from encoder import SIZES
from masks import parse_masks, sample_keep
from nextvid import RECIPE, NextVid, effective_rank, format_scores, next_frame_scores, phases, recolour, schedule
from runtime import StopSignal, autocast, default_dtype, setup_distributed
from vae import open_vae

# Flags that change how a step is computed, never what it computes: a continued run may change them.
RUNTIME = {'out_dir', 'resume', 'stop_at', 'micro_batch_size', 'grad_checkpointing', 'dtype', 'compile', 'num_workers',
           'log_every', 'save_every', 'keep_every', 'eval_steps', 'val', 'device'}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help: a fixed default as usual; for a flag the size's recipe sets, its value at each size."""

    def _get_help_string(self, action):
        if action.default is not None or action.dest not in RECIPE['tiny']:
            return action.help if action.default is None else super()._get_help_string(action)
        sizes = {}
        for size, recipe in RECIPE.items():
            sizes.setdefault(str(recipe[action.dest]), []).append(size)
        return f"{action.help} [" + '; '.join(f"{' '.join(names)}: {value}" for value, names in sizes.items()) + ']'


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split('\n')[0], formatter_class=HelpFormatter)
    data = p.add_argument_group('data')
    data.add_argument('--data', default='synthetic', help="synthetic | list.txt or .csv | videos/ | images/ | mix 'a.csv:0.7,imgs/:0.3'")
    data.add_argument('--val', help='held-out data (as --data) for the fixed evaluation batch (default: clips of --data)')
    data.add_argument('--frames', type=int, help='frames per clip (2 per slot)')
    data.add_argument('--cooldown_frames', type=int, help='frames per clip in the cool-down, the batch shrunk to match (paper: 64)')
    data.add_argument('--resolution', type=int, help='clip height and width in pixels')
    data.add_argument('--fps', type=float, help='frame rate sampled from videos')
    data.add_argument('--skip_short', action='store_true', help="skip videos shorter than a clip (V-JEPA 2's filter); "
                      "by default a short video's last frame repeats")
    data.add_argument('--distractors', type=int, default=2, help='synthetic clips: extra moving objects per training clip')
    data.add_argument('--camera_motion', type=float, default=0.0, help='synthetic clips: background pan, px per frame at 64 px')
    recipe = p.add_argument_group('recipe (Table 8; a continued run keeps it)')
    recipe.add_argument('--size', choices=list(SIZES), default='tiny')
    recipe.add_argument('--steps', type=int, help='optimizer steps; the four stages of Table 8 keep their proportions')
    recipe.add_argument('--batch_size', type=int, help='global batch in clips (all ranks, all accumulation steps)')
    recipe.add_argument('--lr', type=float, help='peak lr; warm-up starts at 0.2x, cool-down ends at 0.002x')
    recipe.add_argument('--decoder_lr', type=float, help='decoder lr in stable 2; 0.375x of it in the cool-down')
    recipe.add_argument('--masks', help="mask generators as blocks x scale, e.g. '8x0.15,2x0.7'")
    recipe.add_argument('--predictor_depth', type=int, help='cross-attention blocks of the predictor (Table 7: 12)')
    recipe.add_argument('--tau_repeats', type=int, help='noise/time draws per clip in the first two stages, then 1')
    recipe.add_argument('--ema', type=float, help='momentum of the reference encoder; 0 = the online encoder itself')
    recipe.add_argument('--flow_weight', type=float, help='weight of L_flow (Eq. 9)')
    recipe.add_argument('--align_weight', type=float, help='weight of L_align (Eq. 9)')
    recipe.add_argument('--target', choices=['pixel', 'vae'], default='pixel', help="the decoder's target: pixels, or the "
                        "latents of the frozen VA-VAE in --vae (Table 3; needs --vae_stats)")
    recipe.add_argument('--vae', help='--target vae: VA-VAE weights (vavae-imagenet256-f16d32-dinov2.pt)')
    recipe.add_argument('--vae_stats', help='--target vae: its latent statistics (latents_stats.pt)')
    recipe.add_argument('--seed', type=int, default=0, help='model init, data order and every random draw')
    ablation = p.add_argument_group("the paper's ablations and deviations (DESIGN.md)")
    ablation.add_argument('--no_mask', action='store_true', help='the encoder sees the whole clip (Table 4)')
    ablation.add_argument('--prediction', choices=['x', 'v'], help='the decoder outputs the clean target (x, JiT) or the velocity (v, the paper)')
    tiny = p.add_argument_group("tiny's adaptations (not in the paper; DESIGN.md)")
    tiny.add_argument('--predictor_lr_scale', type=float, help="the predictor's lr as a multiple of the encoder's (paper: 1)")
    tiny.add_argument('--tau_sampling', choices=['uniform', 'logit_normal'], help='flow times: U(0, 1), or sigmoid(N(-0.8, 0.8))')
    tiny.add_argument('--previous_slot', action=argparse.BooleanOptionalAction, help='queries start from their position a slot earlier')
    tiny.add_argument('--reference_condition', type=float, help="share of decoder inputs that read c'_t, not z_t (paper: 0)")
    tiny.add_argument('--recolour_targets', action=argparse.BooleanOptionalAction, help='the reference encoder reads each '
                      'clip with its colour channels permuted and negated at random')
    run = p.add_argument_group('runtime (a continued run may change these)')
    run.add_argument('--out_dir', default='out', help='the run folder: the same command again continues the run in it')
    run.add_argument('--resume', action='store_true', help='insist on continuing: stop if out_dir holds no checkpoint')
    run.add_argument('--stop_at', type=int, help='save and stop at this step (split a run over jobs)')
    run.add_argument('--micro_batch_size', type=int, help='clips per rank per forward; accumulation is derived')
    run.add_argument('--grad_checkpointing', action=argparse.BooleanOptionalAction, help='recompute encoder and decoder blocks in backward')
    run.add_argument('--dtype', choices=['fp32', 'bf16'], help='autocast precision (default: bf16 on GPUs and CPUs with native bf16)')
    run.add_argument('--compile', action='store_true', help='torch.compile every transformer block')
    run.add_argument('--num_workers', type=int, help='data loader processes per rank (default: 0 on CPU, 8 on GPU)')
    run.add_argument('--log_every', type=int, default=10, help='steps between log lines')
    run.add_argument('--save_every', type=int, default=200, help='steps between checkpoints (ckpt.pt and encoder.pt)')
    run.add_argument('--keep_every', type=int, default=10000, help='steps between kept encoder files (encoder_<step>.pt)')
    run.add_argument('--eval_steps', type=int, default=50, help="Euler steps of the next-frame score at every save")
    run.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu')
    args = p.parse_args(argv)
    given = {k for k, v in vars(args).items() if v != p.get_default(k)}  # flags set on the command line
    sources = {part.split(':')[0].strip() for part in args.data.split(',')}
    if given & {'distractors', 'camera_motion'} and 'synthetic' not in sources:
        p.error('--distractors and --camera_motion change the built-in synthetic clips; --data has none')
    for key, value in RECIPE[args.size].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args, given


def make_loader(args, frames, batch, micro, first, last, offset, rank, world):
    dataset = make_dataset(args.data, frames=frames, resolution=args.resolution, fps=args.fps, train=True, seed=args.seed,
                           distractors=args.distractors, camera_motion=args.camera_motion, skip_short=args.skip_short)
    sampler = StepSampler(first, last, offset, batch, rank, world)
    return torch.utils.data.DataLoader(dataset, batch_size=micro, sampler=sampler, num_workers=args.num_workers,
                                       pin_memory=args.device.startswith("cuda"))


def clip_generators(seed, first, count, device):
    """Per-clip random streams for clips first .. first+count-1 of the run (their global sample numbers):
    (seeds of the model's draws, CPU generators of the masks, CPU generators of the recolouring). A clip
    draws the same whatever its micro-batch, rank count or resume point."""
    bases = [(seed * 2 ** 40 + n) * 4 for n in range(first, first + count)]
    cpu = lambda offset: [torch.Generator().manual_seed(b + offset) for b in bases]
    return bases, cpu(1), cpu(2)


# -----------------------------------------------------------------------------
# the run folder: checkpoint, settings, log and plot


def load_run(args, given):
    """The checkpoint in out_dir to continue, or None for a new run. The run's recipe wins over the
    size's; a flag given on the command line that would change it stops with a message, so a run is
    never overwritten (continuing by default is what makes a requeued job just work)."""
    path = os.path.join(args.out_dir, 'ckpt.pt')
    if not os.path.exists(path):
        if args.resume:
            raise SystemExit(f"--resume: no checkpoint at {path}")
        return None
    checkpoint = torch.load(path, map_location='cpu', weights_only=False)
    for key, value in checkpoint['args'].items():
        if key in RUNTIME:
            continue
        if key in given and getattr(args, key) != value:
            raise SystemExit(f"{args.out_dir} holds a run (step {checkpoint['step']}) with --{key} {value}, not "
                             f"{getattr(args, key)}: a continued run keeps its recipe. The same command without "
                             f"--{key} continues it; a new run needs another --out_dir")
        setattr(args, key, value)
    return checkpoint


def plot_losses(log_path, png_path, width=640, height=360, margin=40):
    """A loss curve (total, flow, align against step) drawn with pillow; False if fewer than two steps were logged."""
    rows = [r for r in map(json.loads, open(log_path)) if 'loss' in r]
    if len(rows) < 2:
        return False
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
    return True


# -----------------------------------------------------------------------------
# training


def check_data(args):
    """--data and --val and every file they list, checked before anything is built (at g on 8 GPUs,
    minutes): a bad spec or a missing file exits with its message alone, on every rank."""
    for flag, spec in (('--data', args.data), ('--val', args.val)):
        try:
            if spec:
                make_dataset(spec, frames=args.frames, resolution=args.resolution, fps=args.fps, train=True, seed=args.seed,
                             distractors=args.distractors, camera_motion=args.camera_motion)
        except (ValueError, FileNotFoundError) as error:
            raise SystemExit(f"{flag} {spec}: {error}")


def train(argv=None):
    args, given = get_args(argv)
    rank, world, args.device = setup_distributed(args.device)
    master = rank == 0
    checkpoint = load_run(args, given)
    check_data(args)
    vae = open_vae(args.target, args.vae, args.vae_stats, SIZES[args.size].get('patch', 16))  # before the models
    if args.num_workers is None:
        args.num_workers = 8 if args.device.startswith('cuda') else 0
    args.dtype = args.dtype or default_dtype(args.device)
    masks = parse_masks(args.masks)
    try:
        plan = phases(args, world, derive_micro='micro_batch_size' not in given)
    except ValueError as error:  # a batch that does not split over the ranks and micro-batches
        raise SystemExit(str(error))
    device, precision = torch.device(args.device), autocast(args.device, args.dtype)

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
    log_path = os.path.join(args.out_dir, 'log.jsonl')
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        settings = dict(vars(args), world=world, phases=[dict(zip(('first', 'last', 'frames', 'batch', 'micro_batch'), phase))
                                                         for phase in plan])
        with open(os.path.join(args.out_dir, 'config.json'), 'w') as f:
            json.dump(settings, f, indent=1)
        print('settings: ' + ' '.join(f"{k}={v}" for k, v in settings.items()))
        print(f"encoder {args.size}: {encoder.num_params() / 1e6:.1f}M, predictor {predictor.num_params() / 1e6:.1f}M, "
              f"decoder {decoder.num_params() / 1e6:.1f}M | {world} rank(s) on {device}, {args.dtype} | "
              f"{'continuing ' + args.out_dir + ' at' if start else 'steps'} {start} -> {end} of {args.steps}")
        fixed = make_dataset(args.val or args.data, frames=args.frames, resolution=args.resolution, fps=args.fps, train=False,
                             seed=args.seed + 1)
        fixed = torch.stack([fixed[i][0] for i in range(32)])  # evaluate()'s clips: one set per seed, whatever --distractors / --camera_motion
        held_out = args.val or args.data == 'synthetic'  # synthetic clips of seed + 1 are never training clips
        eval_clips = f"32 clips of {args.val or args.data}" + ('' if held_out else ' (training data: give --val for held-out clips)')
        print(f"fixed evaluation batch: {eval_clips}")

    def evaluate(step):  # on the fixed batch: the reference features' effective rank, next-frame generation's PSNR
        began = time.time()
        with torch.no_grad(), precision:
            features = torch.cat([ema(chunk.to(device)).mean(1) for chunk in fixed.split(args.micro_batch_size)])
            keep = None if args.no_mask else sample_keep(len(fixed), encoder.grid(fixed), *masks[0],
                                                         generator=torch.Generator().manual_seed(args.seed)).to(device)
            scores = next_frame_scores(encoder, predictor, decoder, fixed.to(device), keep, args.eval_steps,
                                       generator=torch.Generator().manual_seed(args.seed), chunk=args.micro_batch_size,
                                       vae=model.vae)
        rank_now = effective_rank(features)
        tqdm.write(f"step {step} | effective rank of reference features {rank_now:.2f} | {format_scores(scores)}")
        row = dict(step=step, effective_rank=rank_now, eval_clips=eval_clips, eval_s=time.time() - began)
        for name, (all_pixels, masked) in scores.items():
            key = 'psnr_' + name.replace(' ', '_')
            row[key], row[key + '_masked'] = all_pixels, masked
        with open(log_path, 'a') as f:
            f.write(json.dumps(row) + '\n')

    if master and start == 0:
        open(log_path, 'w').close()  # a new run starts a fresh log; a continued one appends to its own
        evaluate(0)
    if master and start >= args.steps:
        print(f"{args.out_dir} holds a finished run of {args.steps} steps: nothing to do (a new run needs another --out_dir)")
    stop = StopSignal(world)
    bar = tqdm(total=end, initial=start, disable=not master, dynamic_ncols=True)
    failures, clock, clips, waited, stopped = 0, time.time(), 0, 0.0, False
    for first, last, frames, batch, micro in plan:
        if max(first, start) >= min(last, end) or stopped:
            continue
        begin = max(first, start)
        sample_of = lambda step: plan[0][3] * min(step, plan[1][0]) + plan[1][3] * max(step - plan[1][0], 0)  # first sample of a step
        loader = make_loader(args, frames, batch, micro, begin, min(last, end), sample_of(begin), rank, world)
        batches, accum = iter(loader), batch // (micro * world)
        for step in range(begin, min(last, end)):
            now = schedule(step, args)
            for group in optimizer.param_groups:
                scale = args.predictor_lr_scale if group['name'] == 'predictor' else 1.0
                group['lr'] = now['decoder_lr'] if group['name'] == 'decoder' else now['lr'] * scale
            flow_sum = align_sum = 0.0
            for micro_step in range(accum):
                wait = time.time()
                video = next(batches)[0].to(device, non_blocking=True)  # (b, 3, F, H, W)
                waited += time.time() - wait
                seeds, mask_rngs, colour_rngs = clip_generators(args.seed, sample_of(step) + rank * (batch // world)
                                                                + micro_step * micro, len(video), device)
                with torch.no_grad(), precision:
                    target = ema(recolour(video, colour_rngs) if args.recolour_targets else video).float()
                    target = F.layer_norm(target, target.shape[-1:])  # (b, N, D), parameter-free
                grid = encoder.grid(video)
                keeps = [None] if args.no_mask else [torch.cat([sample_keep(1, grid, n, s, generator=g) for g in mask_rngs]).to(device)
                                                     for n, s in masks]
                sync = world == 1 or micro_step == accum - 1
                with (nullcontext() if sync else trained.no_sync()), precision:
                    flow, align = trained(video, target, keeps, now['tau_repeats'], seeds)
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
            stopped = stop.requested(device)  # the same answer on every rank
            if done % args.log_every == 0 or done == end or stopped:
                metrics = torch.stack([flow_sum, align_sum])
                if world > 1:
                    dist.all_reduce(metrics, op=dist.ReduceOp.AVG)
                flow_v, align_v = metrics.tolist()
                elapsed, clock = time.time() - clock, time.time()
                reads, short = read_counts(loader.dataset)
                row = dict(step=done, stage=now['stage'], loss=args.flow_weight * flow_v + args.align_weight * align_v, flow=flow_v,
                           align=align_v, lr=now['lr'], decoder_lr=now['decoder_lr'], grad_norm=grad_norm.item(),
                           clips_per_s=clips / elapsed, data_wait=waited / elapsed)
                if reads:  # video clips read so far in this phase (this rank's loader), and the share that ran past the end
                    row['short_clips'] = short / reads
                clips, waited = 0, 0.0
                if master:
                    bar.write(' | '.join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
                    with open(log_path, 'a') as f:
                        f.write(json.dumps(row) + '\n')
            if master and (done % args.save_every == 0 or done == end or stopped):
                save_checkpoint(args.out_dir, model, ema, optimizer, done, vars(args))
                if not stopped:
                    evaluate(done)
                tqdm.write(f"step {done} | saved {args.out_dir}/ckpt.pt and encoder.pt")
            if master and done % args.keep_every == 0:  # the run's history, to probe
                save_encoder(os.path.join(args.out_dir, f'encoder_{done:07d}.pt'), ema, vars(args), done)
            if stopped:
                break
    bar.close()
    stop.restore()
    if world > 1:
        dist.barrier()  # no rank leaves while rank 0 writes
        dist.destroy_process_group()
    if stopped:
        if master:
            print(f"stopped by a signal at step {done}: saved; the same command continues the run")
        raise SystemExit(143)
    if master and start < args.steps:
        if end < args.steps:
            print(f"stopped at step {end} of {args.steps}; the same command without --stop_at continues it")
        else:
            curve = plot_losses(log_path, os.path.join(args.out_dir, 'loss.png'))
            print(f"done: {args.steps} steps; checkpoint {args.out_dir}/ckpt.pt, encoder {args.out_dir}/encoder.pt, "
                  f"log {log_path}" + (f", curve {args.out_dir}/loss.png" if curve else ''))


if __name__ == '__main__':
    train()
