"""
Training speed of NExT-Vid, the way the field states it: clips/s, tokens/s, MFU, peak memory.

    python bench.py --size tiny                                   # CPU: bf16 where native, then fp32
    python bench.py --size s --attn dense                         # compare attention paths
    python bench.py --size l --dtype bf16 --compile               # one GPU
    python bench.py --size g --dtype bf16 --compile             # the size's micro-batch and checkpointing

Runs full training steps (reference encoder, two masked encoder passes, predictor, decoder with
the first stage's tau repeats, AdamW, EMA) on random clips of the size's default shape and
prints one JSON line. Model FLOPs per clip come from the formula in `flops_per_clip`: matmuls
count 2 FLOPs per multiply-add; attention counts only the (query, key) pairs its pattern allows;
trained modules cost 3x their forward (forward + backward), the reference encoder 1x. With
--target vae the step also encodes the clip with the VA-VAE (a random VAE() unless --vae and
--vae_stats name its files), counted 1x: its convolutions and attention (vae_encoder_flops).
tests/test_bench.py checks the formula against torch's FlopCounterMode.

With --data, the data loader alone instead: the clips train.py would read for that --data (the
size's frames, resolution and fps, training crops), read here in one process with one torch thread,
as one DataLoader worker does, so the JSON line's clips_per_s is per worker process:

    python bench.py --data k400/train.txt --size s --clips 50      # clips/s of one worker
    python bench.py --data /tmp/long.mp4 --size s                  # ms per clip at start, middle, end
    python bench.py --data /tmp/long.mp4 --size s --no_seek        # the same, decoding from the start
    python bench.py --data /tmp/long.mp4 --size l --full_size      # the same, decoding frames at full size

A single video file is no --data spec; given one, bench.py times --clips clips (decode and crop)
at each of its start, middle and end, to show what a clip costs deep into a long video.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

import data
import video
from encoder import SIZES
from masks import Pattern, parse_masks, sample_keep
from nextvid import RECIPE, NextVid
from runtime import default_dtype
from vae import VAE, load_vae

PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'L40S': 362.0}  # dense bf16 tensor cores


def pairs(pattern):
    """How many (query, key) pairs the pattern allows."""
    return int(pattern.matrix().sum())


def transformer_flops(tokens, dim, depth, mlp_hidden, attn_pairs):
    """Forward FLOPs of `depth` pre-norm blocks: qkv + proj (4 dim^2), MLP (2 dim hidden) per
    token, and 2 dim for q.k plus 2 dim for the weighted sum per allowed pair."""
    return depth * (2 * tokens * (4 * dim * dim + 2 * dim * mlp_hidden) + 4 * dim * attn_pairs)


def vae_encoder_flops(vae, H, W):
    """Forward FLOPs of vae.encoder and quant_conv on one H x W frame: 2 per multiply-add of every
    conv, and 4 C per (query, key) pair of each attention over all positions of its level."""
    conv = lambda m, h, w: 2 * h * w * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
    resnet = lambda b, h, w: conv(b.conv1, h, w) + conv(b.conv2, h, w) + (
        conv(b.nin_shortcut, h, w) if isinstance(b.nin_shortcut, torch.nn.Conv2d) else 0)
    attn = lambda a, h, w: sum(conv(m, h, w) for m in (a.q, a.k, a.v, a.proj_out)) + 4 * a.q.in_channels * (h * w) ** 2
    enc, h, w = vae.encoder, H, W
    total = conv(enc.conv_in, h, w)
    for level in enc.down:
        for j, block in enumerate(level.block):
            total += resnet(block, h, w) + (attn(level.attn[j], h, w) if level.attn else 0)
        if level.resample:
            h, w = h // 2, w // 2
            total += conv(level.downsample.conv, h, w)
    total += 2 * resnet(enc.mid.block_1, h, w) + attn(enc.mid.attn_1, h, w)  # block_1 and block_2 alike
    return total + conv(enc.conv_out, h, w) + conv(vae.quant_conv, h, w)


def flops_per_clip(encoder, predictor, decoder, grid, kept, tau_repeats, vae=None):
    """Training FLOPs for one clip. kept: tokens per slot the encoder sees, one per mask generator;
    vae: the target's VAE, whose encoder reads every frame once (forward only)."""
    T, h, w = grid
    S, N, L = h * w, T * h * w, (T - 1) * h * w
    D, depth = encoder.dim, len(encoder.blocks)
    hidden = encoder.blocks[0].mlp[0].out_features
    embed = 2 * 3 * encoder.tubelet * encoder.patch ** 2 * D  # Conv3d per token
    full = Pattern('causal', (S,) * T, (S,) * T)
    total = 1 * (N * embed + transformer_flops(N, D, depth, hidden, pairs(full)))  # reference encoder
    d, dd = predictor.context_proj.out_features, decoder.embed.out_features
    p_hidden, d_hidden = predictor.blocks[0].mlp[0].out_features, decoder.blocks[0].mlp[0].out_features
    P = decoder.out.out_features
    for k in kept:
        K = T * k
        enc = transformer_flops(K, D, depth, hidden, pairs(Pattern('causal', (k,) * T, (k,) * T)))
        ar = Pattern('autoregressive', (0,) + (S,) * (T - 1), (k,) * T)
        pred = 2 * K * D * d + 2 * L * d * D  # context in, z out
        # per block: q, proj and MLP on the L queries, k and v on the K context tokens, attention pairs
        pred += len(predictor.blocks) * (2 * L * (2 * d * d + 2 * d * p_hidden) + 2 * K * 2 * d * d + 4 * d * pairs(ar))
        iso = Pattern('isolated', (S,) * (T - 1), (S,) * (T - 1))
        dec = 2 * L * (D + P) * dd + 2 * L * dd * P + transformer_flops(L, dd, len(decoder.blocks), d_hidden, pairs(iso))
        dec += len(decoder.blocks) * 2 * (T - 1) * dd * 6 * dd  # adaLN modulation, once per slot
        total += 2 * N * embed + 3 * (enc + pred + tau_repeats * dec)  # the clip needs no gradient: 2x for the embed
    if vae is not None:
        total += T * encoder.tubelet * vae_encoder_flops(vae, h * encoder.patch, w * encoder.patch)
    return total


def bench_loader(args, recipe):
    """One JSON line: clips/s of reading --data's training clips, or ms per clip at the start, middle
    and end of one video file; `fallbacks` counts reads that could not seek."""
    torch.set_num_threads(1)  # as in a DataLoader worker
    frames, resolution, fps = recipe['frames'], recipe['resolution'], recipe['fps']
    short_side = None if args.full_size else round(resolution * data.CROP_SHORT_SIDE)  # as data.FileClips decodes
    before = dict(seek=not args.no_seek, **({'short_side': None} if args.full_size else {}))  # the old paths, asked for
    data.read_video = lambda *a, **k: video.read_video(*a, **{**k, **before})
    result = dict(data=args.data, size=args.size, frames=frames, resolution=resolution, fps=fps, seek=not args.no_seek,
                  decoded_short_side=short_side or 'full')
    if Path(args.data).suffix.lower() in data.VIDEO_SUFFIXES:
        rng = np.random.default_rng(0)

        def clip(place):
            pixels = torch.from_numpy(data.read_video(args.data, frames, fps, [place], short_side=short_side)[0])
            return data.random_crop_flip(rearrange(pixels, 'f h w c -> c f h w'), resolution, rng)
        clip(0.0)  # warm-up: the file in the page cache
        for name, place in (('start', 0.0), ('middle', 0.5), ('end', 1.0)):
            start = time.perf_counter()
            for _ in range(args.clips):
                clip(place)
            result[f'{name}_ms_per_clip'] = round(1000 * (time.perf_counter() - start) / args.clips, 1)
    else:  # as train.py's make_loader, with num_workers=0 and no batching
        dataset = data.make_dataset(args.data, frames=frames, resolution=resolution, fps=fps, train=True, seed=0)
        dataset[0]  # warm-up
        start = time.perf_counter()
        for i in range(1, args.clips + 1):
            dataset[i]
        seconds = (time.perf_counter() - start) / args.clips
        result.update(clips=args.clips, ms_per_clip=round(1000 * seconds, 1), clips_per_s=round(1 / seconds, 2))
    print(json.dumps(dict(result, fallbacks=video.fallbacks)))


def main():
    p = argparse.ArgumentParser(description='Benchmark NExT-Vid training steps.')
    p.add_argument('--size', choices=list(SIZES), default='tiny')
    p.add_argument('--micro_batch_size', type=int, help="clips per step (default: the size's micro batch)")
    p.add_argument('--dtype', choices=['fp32', 'bf16'], help='autocast precision (default: as train.py; where that is '
                   'bf16 on a CPU, a second row in fp32 follows, from a fresh process)')
    p.add_argument('--compile', action='store_true')
    p.add_argument('--grad_checkpointing', action=argparse.BooleanOptionalAction, help="default: the size's (train.py)")
    p.add_argument('--attn', choices=['auto', 'dense', 'slots', 'flex'], default='auto', help='attention path (masks.attend)')
    p.add_argument('--steps', type=int, default=5, help='timed steps, after 2 warm-up steps')
    p.add_argument('--peak_tflops', type=float, help="the device's peak, for MFU on a device not in PEAK_TFLOPS")
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--target', choices=['pixel', 'vae'], default='pixel', help='vae: the step encodes the clip too')
    p.add_argument('--vae', help='--target vae: weights (default: a random VAE(), no files needed)')
    p.add_argument('--vae_stats', help='--target vae: latent statistics, with --vae')
    p.add_argument('--data', help="time the loader on train.py's --data, or one video file (docstring), not steps")
    p.add_argument('--clips', type=int, default=10, help='--data: clips timed (per position, for one video file)')
    p.add_argument('--no_seek', action='store_true', help='--data: decode videos from the start, as before seeking')
    p.add_argument('--full_size', action='store_true', help="--data: decode frames at full size and resize them "
                   "afterwards, as before decoding at the size the crop needs")
    args = p.parse_args()
    recipe = RECIPE[args.size]
    if args.grad_checkpointing is None:
        args.grad_checkpointing = recipe['grad_checkpointing']
    if args.data:
        return bench_loader(args, recipe)
    micro = args.micro_batch_size or recipe['micro_batch_size']
    device = torch.device(args.device)
    compare = args.dtype is None and device.type == 'cpu' and default_dtype('cpu') == 'bf16'
    args.dtype = args.dtype or default_dtype(args.device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.dtype == 'bf16')

    torch.manual_seed(0)
    vae = None if args.target == 'pixel' else (load_vae(args.vae, args.vae_stats) if args.vae else  # random: no files
                                               VAE().eval().requires_grad_(False)).to(device)
    try:
        model = NextVid.build(args.size, **recipe, target=args.target, vae=vae).to(device)
    except ValueError as error:  # e.g. tiny's patch 8 under the released f16 VAE
        p.error(str(error))
    encoder = model.encoder
    ema = deepcopy(encoder).eval().requires_grad_(False)
    for module in (encoder, model.predictor, model.decoder, ema):
        module.attn_impl = args.attn
    encoder.grad_checkpointing = model.decoder.grad_checkpointing = args.grad_checkpointing
    if args.compile:
        for block in [*encoder.blocks, *model.predictor.blocks, *model.decoder.blocks, *ema.blocks]:
            block.compile(dynamic=False)  # as train.py: fixed kept counts, one graph per length
    optimizer = torch.optim.AdamW(model.param_groups(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == 'cuda')
    ema_params, online_params = list(ema.parameters()), list(encoder.parameters())

    video = torch.randn(micro, 3, recipe['frames'], recipe['resolution'], recipe['resolution'], device=device)
    grid = encoder.grid(video)
    generator = torch.Generator().manual_seed(0)
    keeps = [sample_keep(micro, grid, n, s, generator=generator).to(device) for n, s in parse_masks(recipe['masks'])]

    def step():
        with torch.no_grad(), autocast:
            target = ema(video).float()
            target = F.layer_norm(target, target.shape[-1:])
        with autocast:
            flow, align = model(video, target, keeps, recipe['tau_repeats'])
        (0.5 * flow + align).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, online_params, 1 - recipe['ema'])

    for _ in range(2):
        step()
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps

    kept = [k.shape[1] // grid[0] for k in keeps]
    flops = flops_per_clip(encoder, model.predictor, model.decoder, grid, kept, recipe['tau_repeats'], vae)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    achieved = flops * micro / seconds / 1e12
    if device.type == 'cuda':
        memory = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # peak RSS of the process
    print(json.dumps(dict(
        device=name, size=args.size, target=args.target, micro_batch_size=micro, dtype=args.dtype, compile=args.compile, attn=args.attn,
        grad_checkpointing=args.grad_checkpointing, frames=recipe['frames'], resolution=recipe['resolution'],
        tokens_per_clip=grid[0] * grid[1] * grid[2], kept_per_slot=kept, step_s=round(seconds, 4),
        clips_per_s=round(micro / seconds, 2), tokens_per_s=round(micro * grid[0] * grid[1] * grid[2] / seconds),
        gflops_per_clip=round(flops / 1e9, 2), tflops=round(achieved, 3),
        mfu=round(achieved / peak, 4) if peak else None, peak_memory_gb=round(memory, 2))))
    if compare:  # the CPU default against fp32, each in its own process (peak memory is the process's)
        subprocess.run([sys.executable, *sys.argv, '--dtype', 'fp32'], check=True)


if __name__ == '__main__':
    main()
