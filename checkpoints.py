"""
The files a run leaves: the full training checkpoint and the encoder file, the small file a
pretrained encoder travels in.

    python -c "from checkpoints import load_encoder; print(load_encoder('out/encoder.pt')[1])"

out_dir/ckpt.pt        everything `train.py` needs to continue exactly (one, rolling, rewritten at every save)
out_dir/encoder.pt     the encoder file of the latest save
out_dir/encoder_<step>.pt  encoder files kept every --keep_every steps: the run's history, to probe

An encoder file is a dict: `encoder` (the EMA reference encoder's weights, the one the paper
probes), `config` (Encoder(**config) rebuilds it), `clip` (the frames, resolution and fps it was
pretrained on), `input` (the convention below), `size`, `step`, `format`. Loading it needs only
encoder.py (README, "Using the encoder"):

    state = torch.load('out/encoder.pt', weights_only=True)
    encoder = Encoder(**state['config']).eval()
    encoder.load_state_dict(state['encoder'])
    tokens = encoder(video)  # (B, F/2 * H/p * W/p, D), tokens slot-major

Every file is written to a temporary name and renamed: a crash never leaves half of one.
"""
import os

import torch

from encoder import Encoder

FORMAT = 'nextvid-encoder-1'
INPUT = ('video (B, 3, F, H, W), RGB in [-1, 1] (uint8 / 127.5 - 1), F a multiple of the tubelet (2 frames), '
         'H and W multiples of the patch; frame-wise causal: a token sees its own and earlier tubelets')


def atomic_save(state, path):
    torch.save(state, path + '.tmp')
    os.replace(path + '.tmp', path)


def encoder_file(encoder_state, config, args, step):
    """The encoder file's dict for `encoder_state` (a state dict) pretrained with train.py's `args` (a dict)."""
    clip = {key: args[key] for key in ('frames', 'resolution', 'fps')}
    return dict(format=FORMAT, encoder=encoder_state, config=dict(config), clip=clip, input=INPUT,
                size=args['size'], step=step)


def save_checkpoint(out_dir, model, ema, optimizer, step, args):
    """out_dir/ckpt.pt (raw modules, never the DDP wrapper; the optimizer, the step and the recipe `args`,
    a dict: train.py draws every random number from (seed, step, clip), so that is all the RNG state)
    and out_dir/encoder.pt."""
    state = dict(encoder=model.encoder.state_dict(), ema_encoder=ema.state_dict(), predictor=model.predictor.state_dict(),
                 decoder=model.decoder.state_dict(), optimizer=optimizer.state_dict(), step=step, args=dict(args),
                 encoder_config=dict(model.encoder.config))
    atomic_save(state, os.path.join(out_dir, 'ckpt.pt'))
    save_encoder(os.path.join(out_dir, 'encoder.pt'), ema, args, step)


def save_encoder(path, ema, args, step):
    """An encoder file of the EMA encoder `ema` at `step` of a run with train.py's `args` (a dict)."""
    atomic_save(encoder_file(ema.state_dict(), ema.config, args, step), path)


def load_encoder(path, weights='ema'):
    """A frozen encoder (eval mode, no gradients, on the CPU) from an encoder file or a full checkpoint
    (weights 'ema', the reference encoder, or 'online'; an encoder file holds the EMA one only), and
    what is known of it: dict(size, step, frames, resolution, fps, input)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no checkpoint or encoder file at {path}: `python train.py` writes out/ckpt.pt '
                                f'and out/encoder.pt')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # not a torch file, truncated, or a pickle holding more than tensors
        raise ValueError(f'{path} is neither a train.py checkpoint nor an encoder file ({type(error).__name__})') from error
    if not isinstance(state, dict):
        raise ValueError(f'{path} is neither a train.py checkpoint nor an encoder file')
    if state.get('format') == FORMAT:
        if weights != 'ema':
            raise ValueError(f'{path} is an encoder file: it holds the EMA encoder only, not the {weights} one')
        config, weights_state, info = state['config'], state['encoder'], dict(state['clip'], size=state['size'], step=state['step'])
    elif 'ema_encoder' in state:
        args = state['args']
        config, weights_state = state['encoder_config'], state['ema_encoder' if weights == 'ema' else 'encoder']
        info = dict(size=args['size'], step=state['step'], frames=args['frames'], resolution=args['resolution'], fps=args['fps'])
    else:
        raise ValueError(f'{path} is neither a train.py checkpoint nor an encoder file')
    encoder = Encoder(**config)
    encoder.load_state_dict(weights_state)
    return encoder.eval().requires_grad_(False), dict(info, input=INPUT)
