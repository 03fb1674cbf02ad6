"""
The NExT-Vid objective (arXiv 2512.21004, Eq. 9) and masked next-frame generation, shared by the scripts.

    python -c "from nextvid import *; m = NextVid.build('tiny', **RECIPE['tiny']); print(m)"

- RECIPE: the size presets (the paper's Table 8 for l, h, g; tiny, s and b decided here); STAGES,
  schedule and phases: the four stages of Table 8, step by step.
- NextVid: the three trained networks (encoder, predictor, decoder) and the two losses; the decoder's
  target is pixels or, with a frozen VA-VAE (vae.py, `--target vae`), its latents.
- generate / next_frame_scores: masked next-frame generation as sample.py shows it, and its PSNR
  against the real slots and against two baselines that need no model (in pixels, whatever the target;
  target_frames turns generated target tokens into pixel frames).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

from decoder import Decoder, patchify, unpatchify
from encoder import SIZES, Encoder
from predictor import Predictor
from vae import latent_frames, latent_patch, latent_tokens

# The paper's recipe [Table 8, Eq. 9], the defaults of l, h and g. prediction and tau_sampling are
# the decoder's parameterisation (decoder.py), not the paper's: x (the clean target) because a
# token's 1536 values from a 384-wide decoder is where JiT finds velocity prediction failing, and
# where tiny measured it failing (RESULTS.md); tau uniform as in the paper, JiT's logit-normal an option.
# micro_batch_size and grad_checkpointing say how a step runs, not what it computes (a continued run may
# change them), chosen so that every size's default fits an 80 GB GPU. Measured on one H100 (bf16, README,
# Performance): s at micro-batch 32 without checkpointing, 27.2 GB; l at 8 without, 56.7 GB (so 16 would
# need about twice that); g at 16 with encoder and decoder blocks recomputed, 43.7 GB. So b, l, h and g
# take micro-batch 16 with checkpointing: each is smaller than g in every part, hence under 43.7 GB; the
# cool-down's micro-batch of 4 clips of 64 frames holds as many tokens. Where memory is spare,
# `--no-grad_checkpointing` saves the recomputation (one more forward of those blocks per step).
PAPER = dict(steps=132000, batch_size=3072, micro_batch_size=16, grad_checkpointing=True, lr=5e-4, decoder_lr=8e-4, frames=16, resolution=256, fps=4.0,
             cooldown_frames=64, tau_repeats=4, ema=0.99925, recolour_targets=False, masks='8x0.15,2x0.7', flow_weight=0.5,
             align_weight=1.0, predictor_lr_scale=1.0, prediction='x', tau_sampling='uniform', predictor_depth=12,
             previous_slot=False, reference_condition=0.0,
             predictor=dict(dim=384, heads=12), decoder=dict(dim=384, depth=12, heads=12))
RECIPE = {  # the smaller sizes are decided here
    # tiny: minutes on 2 CPU cores. Adapted to a run of hundreds of steps on an 8 x 8 token grid:
    #   (each kept, and the lr set, by the encoder-first choices of DESIGN.md "Tiny's adaptations")
    #   (ema stays the paper's 0.99925: a faster 0.99 collapsed the features sooner, RESULTS.md)
    #   lr 2.5e-5       the paper's 5e-4 is for batch 3072; at batch 16 it collapses the online encoder; at 1e-4
    #                   the encoder's own learning cost it motion in 400 steps (direction below random init) and
    #                   bought the generator nothing: at 2.5e-5 it keeps random init's level (RESULTS.md).
    #                   Longer runs learn at 1e-4 (the proof run: --lr 1e-4 --predictor_lr_scale 8)
    #   predictor_depth 1   a deeper predictor does the predicting itself and the encoder only learns colour (RESULTS.md)
    #   masks 4x0.15,1x0.5  the paper's 8x0.15,2x0.7 keep only 13 and 1 of 64 positions here (masks.kept_count)
    #   tau_repeats 1   each repeat costs a decoder pass; the CPU budget goes to more clips instead
    #   predictor_lr_scale 32  (8e-4) at 1e-4 the one-block predictor's attention stayed uniform for all 400
    #                   steps (its z was the same for every token of a slot: the decoder drew colour blobs,
    #                   RESULTS.md); at 8e-4 its attention peaks (max weight 0.53 of 64 keys by step 200)
    #   tau logit_normal    JiT's times; with uniform tau the next-frame PSNR was lower (RESULTS.md)
    #   recolour_targets off: recoloured targets (+4 shape on the probe at v-prediction) teach z_t to
    #                   ignore the colours the decoder must draw (RESULTS.md); `--recolour_targets` for the probe recipe
    #   previous_slot   each query starts from its position's encoder output one slot earlier (predictor.py):
    #                   the one-block predictor alone left z_t without each token's detail (RESULTS.md)
    #                   (its copy carries no gradient: with one, seed 2's online encoder read direction at chance)
    #   reference_condition 0.9  that share of the decoder's inputs read c'_t, so the decoder learns to
    #                   draw the detail z_t is pulled towards before z_t has it (0.5: +2.5 dB; 0.75: +3.0; 0.9: +0.2
    #                   more on 3 seeds, RESULTS.md); the other tenth keeps L_flow's gradient into z_t
    'tiny': {**PAPER, 'steps': 400, 'grad_checkpointing': False, 'batch_size': 16, 'lr': 2.5e-5, 'frames': 8, 'resolution': 64, 'cooldown_frames': 16,
             'tau_repeats': 1, 'masks': '4x0.15,1x0.5', 'predictor_lr_scale': 32.0, 'tau_sampling': 'logit_normal',
             'predictor_depth': 1, 'previous_slot': True, 'reference_condition': 0.9,
             'predictor': dict(dim=192, heads=3), 'decoder': dict(dim=192, depth=4, heads=3)},
    's': {**PAPER, 'steps': 20000, 'batch_size': 256, 'micro_batch_size': 32, 'grad_checkpointing': False, 'resolution': 128, 'cooldown_frames': 32,
          'predictor_depth': 6, 'predictor': dict(dim=384, heads=6), 'decoder': dict(dim=384, depth=6, heads=6)},
    'b': {**PAPER, 'steps': 60000, 'batch_size': 1024},
    'l': PAPER, 'h': PAPER, 'g': PAPER,
}


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
            raise ValueError(f"batch of {batch} clips does not divide into micro-batches of {micro} on {world} "
                             f"rank(s) (frames {frames}); choose --batch_size a multiple of micro_batch_size x ranks")
        result.append([frames, batch, micro])
    cooldown_start = schedule(args.steps - 1, args)['start']
    return [(0, cooldown_start, *result[0]), (cooldown_start, args.steps, *result[1])]


def sample_tau(uniform, how):
    """Flow times in (0, 1) from uniform draws, tau = 0 noise and 1 data: 'uniform' (the paper), or
    'logit_normal', JiT's sigmoid(N(-0.8, 0.8)), which spends more draws near the noise end."""
    if how == 'uniform':
        return uniform
    if how == 'logit_normal':  # the normal quantile of the uniform draw
        return torch.sigmoid(torch.special.ndtri(uniform.clamp(1e-7, 1 - 1e-7)) * 0.8 - 0.8)
    raise ValueError(f"tau_sampling must be 'uniform' or 'logit_normal', not {how!r}")


class NextVid(nn.Module):
    """The three trained pieces and the objective: returns (L_flow, L_align) for a batch. The decoder's
    target is pixels (vae None) or the latents of a frozen vae.VAE."""

    def __init__(self, encoder, predictor, decoder, tau_sampling='uniform', vae=None, reference_condition=0.0):
        super().__init__()
        self.encoder, self.predictor, self.decoder = encoder, predictor, decoder
        self.tau_sampling, self.reference_condition = tau_sampling, reference_condition
        # frozen and not trained: a plain attribute, not a submodule, so it stays out of parameters(),
        # state_dict() (the checkpoint records its file paths instead), param_groups() and DDP, and
        # .to() does not move it (the caller does)
        object.__setattr__(self, 'vae', vae)

    @classmethod
    def build(cls, size, predictor, predictor_depth, decoder, prediction, tau_sampling, encoder_config=None,
              target='pixel', vae=None, previous_slot=False, reference_condition=0.0, **_):
        """The networks of a size from recipe entries (RECIPE[size], or a checkpoint's args); target
        'pixel', or 'vae' with the loaded vae.VAE (a checkpoint's args hold its path: pass the module)."""
        encoder = Encoder(**(encoder_config or SIZES[size]))
        if (target == 'vae') != (vae is not None) or target not in ('pixel', 'vae'):
            raise ValueError(f"target {target!r} with vae {type(vae).__name__}: 'vae' needs a loaded VAE, 'pixel' none")
        if vae is None:
            target_dim = encoder.tubelet * encoder.patch ** 2 * 3  # one 2 x p x p x 3 cube of pixels
        else:  # one 2 x p' x p' x C cube of latents, p' = p / f: 64 values for patch 16 over f16d32
            target_dim = encoder.tubelet * latent_patch(encoder.patch, vae.factor) ** 2 * vae.latent_channels
        return cls(encoder, Predictor(encoder.dim, **predictor, depth=predictor_depth, previous_slot=previous_slot),
                   Decoder(encoder.dim, target_dim, **decoder, prediction=prediction), tau_sampling, vae, reference_condition)

    def targets(self, video, sample=True, generator=None):
        """The decoder's targets for every token of video (B, 3, F, H, W): (B, N, target_dim), pixels
        as patchify cuts them, or the VAE's normalised latents, a posterior sample by default as
        LightningDiT trains on (sample=False: the mean; noise from the global RNG unless `generator`)."""
        if self.vae is None:
            return patchify(video, self.encoder.patch, self.encoder.tubelet)
        with torch.no_grad():
            latents = self.vae.encode(video, sample=sample, generator=generator)  # (B, C, F, h, w)
            return latent_tokens(latents, latent_patch(self.encoder.patch, self.vae.factor), self.encoder.tubelet).float()

    def forward(self, video, target, keeps, tau_repeats, seeds=None):
        """video (B, 3, F, H, W); target (B, N, D) reference features; keeps: one (B, K) index
        tensor per mask generator (None = unmasked). Every random draw of a clip (its VAE posterior
        sample, which inputs read c'_t, its noise and times) comes from its own generator, seeded by
        seeds (B,) (default: drawn from the global RNG), so a clip's draws do not depend on which
        micro-batch it is in: train.py resumes with another micro-batch to the same weights."""
        T, h, w = grid = self.encoder.grid(video)
        S, G, R = h * w, len(keeps), tau_repeats
        seeds = torch.randint(0, 2 ** 62, (len(video),)).tolist() if seeds is None else seeds
        generators = [torch.Generator(video.device).manual_seed(int(seed)) for seed in seeds]
        z = torch.cat([self.predictor(self.encoder(video, keep), keep, grid) for keep in keeps])  # (G*B, L, D)
        aim = target[:, S:].repeat(G, 1, 1)  # (G*B, L, D) c'_t
        align = F.mse_loss(z.float(), aim)
        x1 = torch.cat([self.targets(clip[None], generator=g) for clip, g in zip(video, generators)]) \
            if self.vae is not None else self.targets(video)
        x1 = x1[:, S:].repeat(G * R, 1, 1)  # (R*G*B, L, P) slots 1..T-1
        draw = lambda make: rearrange(torch.stack([make(g) for g in generators], 1), 'n b ... -> (n b) ...')
        if self.reference_condition:  # that share of the decoder's inputs reads c'_t itself, not z_t (RECIPE)
            reads_reference = draw(lambda g: torch.rand(G, generator=g, device=z.device)) < self.reference_condition
            z = torch.where(reads_reference[:, None, None], aim.to(z.dtype), z)
        # flow matching, tau_repeats fresh (noise, tau) per decoder input (MAR's trick)
        z = z.repeat(R, 1, 1)  # (R*G*B, L, D)
        x0 = draw(lambda g: torch.randn((R * G, *x1.shape[1:]), generator=g, device=x1.device)).to(x1.dtype)
        tau = sample_tau(draw(lambda g: torch.rand((R * G, T - 1), generator=g, device=x1.device)), self.tau_sampling)
        tau_token = repeat(tau, 'b n -> b (n s) 1', s=S)  # one per sample, slot and repeat
        x_tau = (1 - tau_token) * x0 + tau_token * x1
        velocity = self.decoder(x_tau, z, tau, (T - 1, h, w)).float()
        flow = F.mse_loss(velocity, self.decoder.flow_target(x0, x1, tau_token))
        return flow, align

    def param_groups(self):
        """Weight decay 0.04 on matrices; none on norms, biases and the query token (all 1-D)."""
        groups = []
        for name, module in [('encoder', self.encoder), ('predictor', self.predictor), ('decoder', self.decoder)]:
            params = list(module.parameters())
            groups.append(dict(params=[p for p in params if p.ndim >= 2], weight_decay=0.04, name=name))
            groups.append(dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0, name=name))
        return groups


def recolour(video, generators=None):
    """One of the 48 permutations and sign flips of the colour channels per clip, drawn from its CPU
    generator (default: the global RNG): (B, 3, F, H, W) in [-1, 1] -> the same. Not in the paper: a
    target that does not know the clip's colours can only be predicted from what the colours leave alone."""
    generators = generators or [None] * len(video)
    perm = torch.stack([torch.randperm(3, generator=g) for g in generators]).to(video.device)  # (B, 3)
    sign = torch.stack([torch.randint(0, 2, (3,), generator=g) for g in generators]) * 2 - 1  # (B, 3)
    sign = sign[:, :, None, None, None].to(video.device, video.dtype)
    return torch.gather(video, 1, perm[:, :, None, None, None].expand_as(video)) * sign


# -----------------------------------------------------------------------------
# masked next-frame generation and its score


def target_frames(tokens, grid, patch, tubelet, vae=None):
    """Target tokens (B, T*h*w, P) -> pixel frames (B, 3, T*tubelet, h*patch, w*patch) in [-1, 1]: pixels
    unpatchified, or (vae given) latents unpatchified and decoded by the VAE."""
    if vae is None:
        return unpatchify(tokens, grid, patch, tubelet).clamp(-1, 1)
    latents = latent_frames(tokens, grid, latent_patch(patch, vae.factor), tubelet)  # (B, C, F, h', w')
    return vae.decode(latents.to(vae.mean.dtype)).float().clamp(-1, 1)


@torch.no_grad()
def generate(encoder, predictor, decoder, video, keep, steps, generator, samples=1, vae=None):
    """Slots 1..T-1 of video (B, 3, F, H, W) generated from its context (kept tokens keep (B, K), None:
    all), `samples` draws from different noise: target tokens (samples*B, (T-1)*h*w, P), pixels clamped
    to [-1, 1], or (vae given) the VAE's latents as they come (target_frames decodes them)."""
    T, h, w = grid = encoder.grid(video)
    z = predictor(encoder(video, keep), keep, grid)  # (B, (T-1)*h*w, D)
    z = repeat(z, 'b l d -> (n b) l d', n=samples)  # one noise draw per copy
    tokens = decoder.sample(z, (T - 1, h, w), steps, generator)
    return tokens if vae is not None else tokens.clamp(-1, 1)


def effective_rank(features):
    """exp(entropy) of the normalised singular values of centred (n, D) features; 0 when they do not vary
    (e.g. a --val list of one video: its 32 clips are one centred clip)."""
    s = torch.linalg.svdvals(features.float() - features.float().mean(0))
    if not s.sum() > 0:
        return 0.0
    p = s / s.sum()
    return math.exp(-(p * torch.log(p.clamp_min(1e-12))).sum().item())


def psnr(squared_error, count):
    """PSNR in dB of pixels in [-1, 1] (peak-to-peak 2) from a sum of squared errors over `count` values."""
    return 10 * math.log10(4 * count / squared_error) if count else None


@torch.no_grad()
def next_frame_scores(encoder, predictor, decoder, video, keep, steps, generator, chunk=16, generated=None, vae=None):
    """PSNR of masked next-frame generation on slots 1..T-1 of video (B, 3, F, H, W), pooled over the
    clips, on all pixels and on the masked positions alone, next to two baselines on the same pixels:
    copy: the previous real slot where the encoder saw it, the mean of its seen pixels elsewhere;
    mean colour: each clip's mean colour, a flat frame.
    Returns {name: (all, masked)}; masked is None for an unmasked encoder (keep None). The clips go
    `chunk` at a time, the noise from `generator` in clip order; `generated` (B, (T-1)*h*w, P), the
    output of generate(), scores those slots instead of generating them. With a vae (target vae) the
    generated latents are decoded to pixels first: every score is in pixels."""
    T, h, w = encoder.grid(video)
    S = h * w
    names = ('generated', 'copy', 'mean colour')
    errors = {name: [0.0, 0.0] for name in names}  # squared error summed over all pixels, masked pixels
    counts = [0, 0]
    parts = zip(video.split(chunk), keep.split(chunk) if keep is not None else [None] * len(video),
                generated.split(chunk) if generated is not None else [None] * len(video))
    for part, part_keep, part_generated in parts:
        tokens = rearrange(patchify(part, encoder.patch, encoder.tubelet), 'b (t s) (q c) -> b t s q c', t=T, c=3)
        seen = torch.ones(len(part), T * S, dtype=torch.bool, device=part.device)
        if part_keep is not None:
            seen = torch.zeros_like(seen).scatter_(1, part_keep, True)
        seen = rearrange(seen, 'b (t s) -> b t s 1 1', t=T)  # (b, T, S, 1, 1): the same positions every slot
        previous, seen_before = tokens[:, :-1], seen[:, :-1]  # (b, T-1, S, q, 3): the slot before each target
        seen_pixels = (seen_before.sum(2, keepdim=True) * previous.shape[3]).clamp_min(1)  # (b, T-1, 1, 1, 1)
        seen_mean = (previous * seen_before).sum((2, 3), keepdim=True) / seen_pixels  # (b, T-1, 1, 1, 3)
        if part_generated is None:
            part_generated = generate(encoder, predictor, decoder, part, part_keep, steps, generator, vae=vae)  # (b, (T-1)*S, P)
        if vae is not None:  # latents -> pixel frames -> pixel tokens
            part_generated = patchify(target_frames(part_generated, (T - 1, h, w), encoder.patch, encoder.tubelet, vae),
                                      encoder.patch, encoder.tubelet)
        estimates = dict(zip(names, [rearrange(part_generated, 'b (t s) (q c) -> b t s q c', t=T - 1, c=3),
                                     torch.where(seen_before, previous, seen_mean),
                                     tokens.mean((1, 2, 3), keepdim=True).expand_as(previous)]))
        real, masked = tokens[:, 1:].float(), (~seen[:, 1:]).expand_as(previous)
        for name, estimate in estimates.items():
            error = (estimate.float() - real).square()
            errors[name][0] += error.sum().item()
            errors[name][1] += error[masked].sum().item()
        counts[0], counts[1] = counts[0] + real.numel(), counts[1] + masked.sum().item()
    return {name: (psnr(errors[name][0], counts[0]), psnr(errors[name][1], counts[1]) if keep is not None else None)
            for name in names}


def format_scores(scores):
    """One line: 'next-frame PSNR (dB, all / masked): generated 15.2 / 13.1 | copy ... | mean colour ...'."""
    show = lambda value: '-' if value is None else f'{value:.2f}'
    return 'next-frame PSNR (dB, all / masked): ' + ' | '.join(
        f'{name} {show(all_pixels)} / {show(masked)}' for name, (all_pixels, masked) in scores.items())
