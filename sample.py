"""
Look at what a NExT-Vid checkpoint generates (arXiv 2512.21004): the decoder turns the predictor's
latent z_t into slot t's pixels, so its samples show what the model expects the next frame to be.

    python sample.py                                  # out/ckpt.pt on 4 held-out synthetic clips
    python sample.py --video clip.mp4 --samples 3     # a real video, 3 draws from different noise
    python sample.py --image cat.jpg --rollout 6      # grow a still picture by 6 generated slots

Masked next-frame generation (default): the encoder reads the clip under the checkpoint's first
mask generator (none if it was trained with --no_mask), the predictor gives z_t for slots 1..T-1,
and the decoder integrates its velocity from noise (tau = 0) to pixels (tau = 1) by Euler steps.
Slot 0 is context only, so it is grey in the generated rows. Writes generation.png (rows "real",
"masked input", "generated" or "sample 1..n" per clip, one column per frame) and generation.gif /
generation.mp4 (the same videos side by side, one clip per row).

Rollout (--rollout K): from the first slot of the clip (or the --image picture), generate the next
slot, append it, re-encode the whole unmasked past, and repeat K times. Writes rollout.png/.gif/.mp4
next to the real clip (for --image, the still picture itself).

A --target vae checkpoint generates VA-VAE latents: the VAE is loaded from the files its args record
(train.py's --vae, --vae_stats) and decodes them to pixels for the pictures, the scores and the rollout.
"""
import argparse
import os
from fractions import Fraction

import av
import torch
from einops import rearrange, repeat
from PIL import Image, ImageDraw

from data import load_image_clip, load_video_clip, make_dataset
from decoder import patchify, unpatchify
from masks import parse_masks, sample_keep
from nextvid import NextVid, format_scores, generate, next_frame_scores, target_frames
from runtime import autocast, default_dtype
from vae import open_vae

DISPLAY = 128  # frames are upscaled (nearest) by the largest whole factor that keeps them <= this, at least 1
LABEL_WIDTH, HEADER, GAP, GROUP_GAP = 90, 16, 2, 10  # pixels: row labels, text lines, between cells, between clips


def get_args(argv=None):
    p = argparse.ArgumentParser(description=' '.join(__doc__.strip().split('\n\n')[0].split()),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ckpt', default='out/ckpt.pt')
    p.add_argument('--out_dir', default='out/samples')
    source = p.add_mutually_exclusive_group()
    source.add_argument('--video', help='a video file (its centred clip at the checkpoint fps and resolution)')
    source.add_argument('--image', help='a still picture, read as a frame-invariant clip')
    p.add_argument('--clips', type=int, default=4, help='held-out synthetic clips when neither --video nor --image')
    p.add_argument('--rollout', type=int, default=0, help='generate this many slots autoregressively from the first')
    p.add_argument('--steps', type=int, default=50, help='Euler steps from noise to pixels')
    p.add_argument('--samples', type=int, default=1, help='draws from different noise per clip')
    p.add_argument('--seed', type=int, default=0, help='seeds the mask, the noise and which synthetic clips')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--dtype', choices=['fp32', 'bf16'], help='autocast precision (default: bf16 on GPUs and CPUs with '
                   'native bf16, fp32 elsewhere; the Euler steps accumulate in fp32 either way)')
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# model


def load_models(path, device):
    """Online encoder, predictor and decoder of a train.py checkpoint, its frozen VAE (None for a
    pixel target) and its training args."""
    if not os.path.exists(path):
        raise SystemExit(f"no checkpoint at {path}: make one with `python train.py` (or point --ckpt at one)")
    checkpoint = torch.load(path, map_location='cpu', weights_only=False)
    train_args = {'prediction': 'v', 'tau_sampling': 'uniform', 'target': 'pixel', 'vae': None, 'vae_stats': None,
                  **checkpoint['args']}  # runs before --prediction were v
    patch = checkpoint['encoder_config'].get('patch', 16)  # 16: Encoder's default
    vae = open_vae(train_args['target'], train_args['vae'], train_args['vae_stats'], patch)
    with torch.device('meta'):  # no time spent on a random init that the checkpoint overwrites
        model = NextVid.build(**{**train_args, 'vae': vae}, encoder_config=checkpoint['encoder_config'])
    encoder, predictor, decoder = model.encoder, model.predictor, model.decoder
    for name, module in [('encoder', encoder), ('predictor', predictor), ('decoder', decoder)]:
        module.load_state_dict(checkpoint[name], assign=True)  # the online encoder: the predictor learned on its context
        module.to(device).eval()
    train_args['step'] = checkpoint['step']
    return encoder, predictor, decoder, vae.to(device) if vae else None, train_args


def first_mask(train_args, batch, grid, seed, device):
    """Kept tokens (B, T*k) from the checkpoint's first mask generator, or None (--no_mask run)."""
    if train_args['no_mask']:
        return None
    num_blocks, scale = parse_masks(train_args['masks'])[0]
    return sample_keep(batch, grid, num_blocks, scale, generator=torch.Generator().manual_seed(seed)).to(device)


def hide_masked(video, keep, grid, patch, tubelet):
    """The clip (B, 3, F, H, W) as the encoder saw it: tokens not in keep (B, K) painted grey (0)."""
    tokens = patchify(video, patch, tubelet)  # (B, N, P)
    seen = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=video.device).scatter_(1, keep, True)
    return unpatchify(tokens * seen[..., None], grid, patch, tubelet)


@torch.no_grad()
def rollout(encoder, predictor, decoder, seed, slots, steps, generator, vae=None):
    """Grow seed (B, 3, tubelet, H, W) by `slots` generated slots: (B, 3, tubelet * (1 + slots), H, W);
    with a vae, each slot's generated latents are decoded to pixels before they are appended."""
    video = seed
    for _ in range(slots):
        # To generate slot t, encode t + 1 slots whose last one is a placeholder (zeros). It cannot
        # leak into the result: the encoder is frame-causal and the predictor's z for slot t attends
        # only to context slots < t, so the placeholder's own features are never read.
        grown = torch.cat([video, torch.zeros_like(seed)], dim=2)  # (B, 3, F + tubelet, H, W)
        _, h, w = grid = encoder.grid(grown)
        z = predictor(encoder(grown), None, grid)[:, -h * w:]  # (B, h*w, D): the last slot's latents
        tokens = decoder.sample(z, (1, h, w), steps, generator)  # (B, h*w, P)
        next_slot = target_frames(tokens, (1, h, w), encoder.patch, encoder.tubelet, vae)  # (B, 3, tubelet, H, W)
        video = torch.cat([video, next_slot], dim=2)
    return video


# -----------------------------------------------------------------------------
# pictures and videos


def to_frames(video):
    """(3, F, H, W) in [-1, 1] -> list of F uint8 arrays (H, W, 3)."""
    pixels = ((video.clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    return list(rearrange(pixels, 'c f h w -> f h w c').numpy())


def tile(cells, row_labels, column_labels, title, group):
    """One picture of cells[r][c] (uint8 (H, W, 3) arrays, all one size) upscaled (nearest), with a
    title line, a label left of each row and above each column, and a wider gap after every `group` rows."""
    H, W = cells[0][0].shape[:2]
    scale = max(1, DISPLAY // max(H, W))
    cell_h, cell_w = H * scale + GAP, W * scale + GAP
    width = LABEL_WIDTH + len(column_labels) * cell_w
    height = 2 * HEADER + len(cells) * cell_h + (len(cells) - 1) // group * GROUP_GAP
    picture = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(picture)
    draw.text((4, 2), title, fill='black')
    for c, label in enumerate(column_labels):
        draw.text((LABEL_WIDTH + c * cell_w, HEADER + 2), label, fill='black')
    for r, (row, label) in enumerate(zip(cells, row_labels)):
        top = 2 * HEADER + r * cell_h + r // group * GROUP_GAP
        draw.text((4, top + cell_h // 2 - 6), label, fill='black')
        for c, cell in enumerate(row):
            picture.paste(Image.fromarray(cell).resize((W * scale, H * scale), Image.NEAREST), (LABEL_WIDTH + c * cell_w, top))
    return picture


def layouts(videos, title, tubelet):
    """videos: {label: (B, 3, F, H, W)}. Returns the still picture (one row per clip and label, one
    column per frame) and the animation (one picture per frame: one row per clip, one column per label)."""
    clips, _, length = next(iter(videos.values())).shape[:3]
    frames = {label: [to_frames(clip) for clip in video] for label, video in videos.items()}  # label -> B x F
    rows = [frames[label][b] for b in range(clips) for label in videos]
    slot_labels = [f"slot {f // tubelet}" if f % tubelet == 0 else '' for f in range(length)]
    still = tile(rows, list(videos) * clips, slot_labels, title, group=len(videos))
    # the frame counter in the title also keeps consecutive GIF frames distinct (pillow merges equal ones)
    animation = [tile([[frames[label][b][f] for label in videos] for b in range(clips)],
                      [f"clip {b + 1}" for b in range(clips)], list(videos),
                      f"frame {f + 1}/{length}, slot {f // tubelet}", group=1) for f in range(length)]
    return still, animation


def write_mp4(pictures, path, fps):
    """Pictures of one size -> H.264 (MPEG-4 where the av wheel lacks libx264), yuv420p, even size."""
    width, height = (size - size % 2 for size in pictures[0].size)
    with av.open(path, 'w') as container:
        stream = container.add_stream('libx264' if 'libx264' in av.codecs_available else 'mpeg4',
                                      rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, 'yuv420p'
        for picture in pictures:
            container.mux(stream.encode(av.VideoFrame.from_image(picture.crop((0, 0, width, height)))))
        container.mux(stream.encode())  # flush the frames the encoder still holds


def save(still, animation, out_dir, name, fps):
    """name.png, name.gif and name.mp4 in out_dir; returns their paths."""
    png, gif, mp4 = (os.path.join(out_dir, name + ext) for ext in ('.png', '.gif', '.mp4'))
    still.save(png)
    animation[0].save(gif, save_all=True, append_images=animation[1:], duration=round(1000 / fps), loop=0)
    write_mp4(animation, mp4, fps)
    return [png, gif, mp4]


# -----------------------------------------------------------------------------
# main


def load_clips(args, frames, train_args):
    """(B, 3, frames, R, R) in [-1, 1]: the --video or --image clip, else --clips synthetic clips that
    training never drew (train.py's data uses the run's seed; these use seed + 1 + --seed)."""
    resolution = train_args['resolution']
    try:  # a missing or undecodable file: its message alone, no traceback
        if args.video:
            return load_video_clip(args.video, frames, train_args['fps'], resolution)[None]
        if args.image:
            return load_image_clip(args.image, frames, resolution)[None]
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"sample.py: {error}")
    dataset = make_dataset('synthetic', frames=frames, resolution=resolution, fps=train_args['fps'], train=False,
                           seed=train_args['seed'] + 1 + args.seed)
    return torch.stack([dataset[i][0] for i in range(args.clips)])


def make_videos(args, encoder, predictor, decoder, vae, train_args, video, noise):
    """The rows of the picture: ({row name: (B, 3, F, H, W)} of real clips, [(B, 3, F, H, W)] per draw,
    the next-frame scores or None for a rollout, and the names of the output, of one draw and of the task)."""
    if args.rollout:
        seed = repeat(video[:, :, :encoder.tubelet], 'b c f h w -> (b n) c f h w', n=args.samples)
        draws = rollout(encoder, predictor, decoder, seed, args.rollout, args.steps, noise, vae)
        draws = rearrange(draws.float(), '(b n) c f h w -> n b c f h w', n=args.samples)
        return {'real': video}, draws, None, 'rollout', 'rollout', f"rollout of {args.rollout} slots from slot 0"
    grid = encoder.grid(video)
    keep = first_mask(train_args, len(video), grid, args.seed, args.device)
    tokens = generate(encoder, predictor, decoder, video, keep, args.steps, noise, args.samples, vae)  # (n*B, L, P)
    T, h, w = grid
    frames = target_frames(tokens, (T - 1, h, w), encoder.patch, encoder.tubelet, vae).float()  # (n*B, 3, F-2, H, W)
    frames = torch.cat([torch.zeros_like(frames[:, :, :encoder.tubelet]), frames], dim=2)  # slot 0 grey: context only
    draws = rearrange(frames, '(n b) c f h w -> n b c f h w', n=args.samples)
    scores = next_frame_scores(encoder, predictor, decoder, video, keep, args.steps, noise,
                               generated=tokens[:len(video)], vae=vae)  # the first draw
    if keep is None:
        videos = {'real': video, 'input (no mask)': video}
    else:
        videos = {'real': video, 'masked input': hide_masked(video, keep, grid, encoder.patch, encoder.tubelet)}
    return videos, draws, scores, 'generation', 'generated', 'masked next-frame generation'


def main(argv=None):
    args = get_args(argv)
    encoder, predictor, decoder, vae, train_args = load_models(args.ckpt, args.device)
    frames = encoder.tubelet * (1 + args.rollout) if args.rollout else train_args['frames']
    video = load_clips(args, frames, train_args).to(args.device)  # (B, 3, F, H, W)
    noise = torch.Generator().manual_seed(args.seed)
    with autocast(args.device, args.dtype or default_dtype(args.device)):
        videos, draws, scores, name, one_draw, task = make_videos(args, encoder, predictor, decoder, vae, train_args,
                                                                  video, noise)
    if scores:
        print(f"{len(video)} clip(s), {format_scores(scores)}")
    labels = [one_draw] if args.samples == 1 else [f"sample {i + 1}" for i in range(args.samples)]
    videos.update(zip(labels, draws))  # each (B, 3, F, H, W)
    source = os.path.basename(args.video or args.image or 'synthetic clips')
    title = f"{source}: {task}, checkpoint step {train_args['step']}, {args.steps} Euler steps"
    still, animation = layouts(videos, title, encoder.tubelet)
    os.makedirs(args.out_dir, exist_ok=True)
    paths = save(still, animation, args.out_dir, name, train_args['fps'])
    for path in paths:
        print(path)
    return paths


if __name__ == '__main__':
    main()
