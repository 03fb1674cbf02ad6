"""
VA-VAE: the frozen image autoencoder whose latents NExT-Vid's decoder can target instead of pixels.

VA-VAE (Yao, Yang, Wang, "Reconstruction vs. Generation", CVPR 2025; code hustvl/LightningDiT)
is a plain LDM AutoencoderKL trained with its latents aligned to DINOv2: f16, 32 latent
channels, ch 128, ch_mult (1, 1, 2, 2, 4), 2 residual blocks per level, attention at the 16 x 16
level and in the middle. The modules below follow CompVis latent-diffusion's
ldm/modules/diffusionmodules/model.py so that state-dict keys match the released checkpoint
(encoder.down.0.block.0.norm1.weight, decoder.up.4.attn.0.q.weight, quant_conv.weight, ...);
ResnetBlock and AttnBlock keep LDM's names, as the checkpoint does. Input is RGB in [-1, 1].

A clip (B, 3, F, H, W) is encoded frame by frame (F folded into the batch) to a posterior
N(mean, exp(logvar)) with logvar clamped to [-30, 20] as in LDM; `encode` draws from it by
default, as LightningDiT does, and normalises per channel with the released statistics,
(z - mean) / std. `latent_tokens` cuts the latents into the ViT encoder's token grid with
the same ordering as decoder.patchify, so each token's target is its 2 x p' x p' x C latent cube.

The weights (not in this repo): vavae-imagenet256-f16d32-dinov2.pt and latents_stats.pt from
huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2. Print the parameter counts with:
    python -c "import torch; from vae import VAE; torch.set_default_device('meta'); print(VAE().num_params())"
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from decoder import patchify, unpatchify

PREFIXES = ('encoder.', 'decoder.', 'quant_conv.', 'post_quant_conv.')  # the autoencoder's keys in a checkpoint


def norm(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1 `nin_shortcut` where channels change."""

    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):  # (B, cin, H, W) -> (B, cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q, k, v and proj_out are 1x1 convs."""

    def __init__(self, channels, groups):
        super().__init__()
        self.norm = norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):  # (B, C, H, W)
        h = self.norm(x)
        q, k, v = (rearrange(f(h), 'b c y x -> b 1 (y x) c') for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C), scale C^-0.5 as LDM
        return x + self.proj_out(rearrange(out, 'b 1 (y x) c -> b c y x', y=x.shape[2]))


class Resample(nn.Module):
    """Down: zero-pad one pixel right and bottom (LDM), stride-2 3x3 conv. Up: nearest x2, 3x3 conv."""

    def __init__(self, channels, up):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x):  # (B, C, H, W) -> (B, C, 2H, 2W) up, (B, C, H/2, W/2) down
        if self.up:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution: residual blocks (the first from cin), each followed by attention when
    `attend`, then `resample` ('downsample', 'upsample' or None) under LDM's key name."""

    def __init__(self, cin, cout, blocks, attend, groups, resample=None):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(blocks)])
        self.attn = nn.ModuleList([AttnBlock(cout, groups) for _ in range(blocks)] if attend else [])
        self.resample = resample
        if resample:
            self.add_module(resample, Resample(cout, up=resample == 'upsample'))

    def forward(self, x):
        for j, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[j](x)
        return getattr(self, self.resample)(x) if self.resample else x


class Middle(nn.Module):
    """block_1, attn_1, block_2 at the lowest resolution."""

    def __init__(self, channels, groups):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, 2*z_channels, H/f, W/f): mean and log-variance (double_z)."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, groups):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin, res = ch, resolution
        for i, mult in enumerate(ch_mult):
            self.down.append(Level(cin, ch * mult, num_res_blocks, res in attn_resolutions, groups,
                                   'downsample' if i < len(ch_mult) - 1 else None))
            cin, res = ch * mult, res // 2
        self.mid = Middle(cin, groups)
        self.norm_out = norm(cin, groups)
        self.conv_out = nn.Conv2d(cin, 2 * z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h*f, w*f). up.0 is the full resolution, run last."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, groups):
        super().__init__()
        cin, res = ch * ch_mult[-1], resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        self.mid = Middle(cin, groups)
        up = []
        for i in reversed(range(len(ch_mult))):
            up.append(Level(cin, ch * ch_mult[i], num_res_blocks + 1, res in attn_resolutions, groups,
                            'upsample' if i > 0 else None))
            cin, res = ch * ch_mult[i], res * 2
        self.up = nn.ModuleList(up[::-1])
        self.norm_out = norm(cin, groups)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    """The VA-VAE f16d32 autoencoder by default; smaller ones for tests (GroupNorm uses
    min(groups, ch) groups, so ch=8 works). `resolution` only places the attention: a level
    attends when its side, for a resolution x resolution input, is in attn_resolutions."""

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                 resolution=256, latent_channels=32, groups=32):
        super().__init__()
        config = (ch, ch_mult, num_res_blocks, attn_resolutions, resolution, latent_channels, min(groups, ch))
        self.encoder = Encoder(*config)
        self.decoder = Decoder(*config)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.factor = 2 ** (len(ch_mult) - 1)
        self.latent_channels = latent_channels
        # per-channel latent statistics (latents_stats.pt); not in the state dict
        self.register_buffer('mean', torch.zeros(1, latent_channels, 1, 1), persistent=False)
        self.register_buffer('std', torch.ones(1, latent_channels, 1, 1), persistent=False)

    def set_stats(self, mean, std):
        for name, value in (('mean', mean), ('std', std)):
            if value.numel() != self.latent_channels:
                raise ValueError(f"latent {name} has {value.numel()} values, the VAE has {self.latent_channels} channels")
            getattr(self, name).copy_(value.reshape(1, -1, 1, 1))

    def encode(self, frames, sample=True, generator=None):
        """frames (B, 3, F, H, W) in [-1, 1] -> normalised latents (B, C, F, H/f, W/f). Each frame
        is encoded on its own. sample=True draws mean + exp(logvar / 2) * noise (noise from
        `generator` on its device); sample=False gives the posterior mean."""
        B, _, _, H, W = frames.shape
        if H % self.factor or W % self.factor:
            raise ValueError(f"frames of {H}x{W} are not divisible by the VAE's factor {self.factor}")
        x = rearrange(frames, 'b c f h w -> (b f) c h w')
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)  # (B*F, C, h, w) each
        z = mean
        if sample:
            device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=device).to(mean)
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
        z = (z - self.mean) / self.std
        return rearrange(z, '(b f) c h w -> b c f h w', b=B)

    def decode(self, latents):
        """Normalised latents (B, C, F, h, w) -> pixels (B, 3, F, h*f, w*f), frame by frame."""
        z = rearrange(latents, 'b c f h w -> (b f) c h w') * self.std + self.mean
        x = self.decoder(self.post_quant_conv(z))
        return rearrange(x, '(b f) c h w -> b c f h w', b=latents.shape[0])

    def num_params(self):
        count = lambda *modules: sum(p.numel() for m in modules for p in m.parameters())
        return {'encoder': count(self.encoder, self.quant_conv), 'decoder': count(self.decoder, self.post_quant_conv)}


def load_vae(weights, stats=None, **config):
    """A VAE(**config) in eval mode with requires_grad False, loaded from `weights` (a state dict,
    possibly under 'state_dict'; only the keys under PREFIXES are read, so loss.*,
    foundation_model.* and linear_proj.* are ignored) and, if given, `stats` ({'mean', 'std'}).
    Raises FileNotFoundError for a missing file, and ValueError naming the missing, unexpected
    and differently shaped autoencoder keys when the checkpoint does not fit the config.
    A weights file may carry its own VAE arguments under a top-level 'config' dict (small VAEs
    written by tests); `config` given here wins over them. The released file has none: VAE()'s defaults."""
    state = read(weights)
    config = {**state.get('config', {}), **config}
    vae = VAE(**config)
    state = {k: v for k, v in state.get('state_dict', state).items() if k.startswith(PREFIXES)}
    own = vae.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    reshaped = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        listing = lambda keys: f"{len(keys)} {keys[:5]}{' ...' if len(keys) > 5 else ''}"
        raise ValueError(f"{weights} does not fit VAE({config}): missing {listing(missing)}, "
                         f"unexpected {listing(unexpected)}, other shape {listing(reshaped)}")
    vae.load_state_dict(state)
    if stats is not None:
        latent_stats = read(stats)
        vae.set_stats(latent_stats['mean'], latent_stats['std'])
    return vae.eval().requires_grad_(False)


def read(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path} (VA-VAE files: huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2)")
    return torch.load(path, map_location='cpu', weights_only=False)


# -----------------------------------------------------------------------------
# latents as the ViT encoder's tokens: one 2 x p' x p' x C latent cube per token, slot-major
# (t, y, x) and within a token (pt ph pw c), exactly as decoder.patchify orders pixels


def latent_patch(patch, factor):
    """The side in latent pixels of a ViT patch of `patch` pixels over a factor-f VAE."""
    if patch % factor:
        raise ValueError(f"the ViT patch {patch} is not a multiple of the VAE's factor {factor}: "
                         f"a token would not cover whole latent pixels")
    return patch // factor


def latent_tokens(latents, patch, tubelet=2):
    """(B, C, F, h, w) -> (B, T*h'*w', tubelet*patch*patch*C), patch in latent pixels
    (latent_patch(vit_patch, vae.factor)). At f16 with ViT patch 16, patch is 1 and a token
    is its slot's two frames' C values stacked: [z(2t, y, x), z(2t+1, y, x)], 64 at C=32."""
    return patchify(latents, patch, tubelet)


def latent_frames(tokens, grid, patch, tubelet=2):
    """(B, T*h'*w', tubelet*patch*patch*C) -> (B, C, T*tubelet, h'*patch, w'*patch); grid (T, h', w')."""
    return unpatchify(tokens, grid, patch, tubelet)


def open_vae(target, weights, stats, patch):
    """The frozen VAE of a --target vae run (None for pixels), or SystemExit with the reason: a flag
    or file missing, weights that do not fit, a ViT patch that is not a multiple of its factor."""
    if target != 'vae':
        return None
    for flag, path in (('vae', weights), ('vae_stats', stats)):
        if not path:
            raise SystemExit(f"--target vae needs --{flag}")
        if not os.path.isfile(path):
            raise SystemExit(f"--{flag} {path}: no such file (VA-VAE files: huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2)")
    try:
        vae = load_vae(weights, stats)
        latent_patch(patch, vae.factor)
    except (ValueError, FileNotFoundError, KeyError) as error:
        raise SystemExit(f"--target vae: {error}")
    return vae
