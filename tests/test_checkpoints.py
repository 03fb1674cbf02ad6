"""checkpoints.py: the encoder file loads with its docstring's lines and gives the full checkpoint's EMA
encoder's features; load_encoder reads either file; clear errors on a missing or a wrong file (CPU, seconds)."""
import copy
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoints  # noqa: E402
from encoder import Encoder  # noqa: E402
from nextvid import RECIPE, NextVid  # noqa: E402


def save_run(out_dir, step=4):
    """A tiny run's files as train.py leaves them (checkpoints.save_checkpoint), the EMA encoder unlike
    the online one; returns them."""
    torch.manual_seed(0)
    args = {**RECIPE['tiny'], 'size': 'tiny', 'frames': 4, 'resolution': 32}
    model = NextVid.build(**args)
    ema = copy.deepcopy(model.encoder)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoints.save_checkpoint(str(out_dir), model, ema, optimizer, step, args)
    return model.encoder, ema


def snippet():
    """The loading lines of checkpoints.py's docstring, as a user copies them."""
    lines = checkpoints.__doc__.split('Loading it needs only')[1].splitlines()
    code = [line[4:] for line in lines if line.startswith('    ')]
    assert any('Encoder(**state' in line for line in code) and any('load_state_dict' in line for line in code)
    return '\n'.join(code)


def test_the_encoder_file_loads_with_the_docstrings_lines(tmp_path):
    online, ema = save_run(tmp_path)
    torch.manual_seed(1)
    video = torch.rand(2, 3, 4, 32, 32) * 2 - 1  # (B, 3, F, H, W) in [-1, 1]
    namespace = dict(torch=torch, Encoder=Encoder, video=video)
    exec(snippet().replace('out/encoder.pt', str(tmp_path / 'encoder.pt')), namespace)
    assert not namespace['encoder'].training
    tokens = namespace['tokens']
    assert tokens.shape == (2, 2 * 4 * 4, 192)  # (B, F/2 * H/p * W/p, D)
    with torch.no_grad():
        torch.testing.assert_close(tokens, ema.eval()(video), rtol=0, atol=0)  # the EMA encoder, not the online one
        assert not torch.allclose(tokens, online.eval()(video))
        full, _ = checkpoints.load_encoder(str(tmp_path / 'ckpt.pt'))
        torch.testing.assert_close(tokens, full(video), rtol=0, atol=0)  # the full checkpoint's EMA encoder


def test_load_encoder_reads_either_file(tmp_path):
    online, ema = save_run(tmp_path, step=6)
    small, small_info = checkpoints.load_encoder(str(tmp_path / 'encoder.pt'))
    full, full_info = checkpoints.load_encoder(str(tmp_path / 'ckpt.pt'))
    moving, _ = checkpoints.load_encoder(str(tmp_path / 'ckpt.pt'), weights='online')
    expected = dict(size='tiny', step=6, frames=4, resolution=32, fps=RECIPE['tiny']['fps'], input=checkpoints.INPUT)
    assert small_info == full_info == expected
    assert '[-1, 1]' in small_info['input'] and '(B, 3, F, H, W)' in small_info['input']
    for name, value in ema.state_dict().items():
        assert torch.equal(small.state_dict()[name], value) and torch.equal(full.state_dict()[name], value)
    assert all(torch.equal(moving.state_dict()[name], value) for name, value in online.state_dict().items())
    for encoder in (small, full, moving):
        assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert os.path.getsize(tmp_path / 'encoder.pt') < os.path.getsize(tmp_path / 'ckpt.pt') / 3  # no optimizer, no decoder
    with pytest.raises(ValueError, match='EMA encoder only'):
        checkpoints.load_encoder(str(tmp_path / 'encoder.pt'), weights='online')


def test_clear_errors_on_a_missing_or_a_wrong_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape('python train.py')):
        checkpoints.load_encoder(str(tmp_path / 'nothing.pt'))
    torch.save({'model': {}}, tmp_path / 'other.pt')  # some other torch file
    with pytest.raises(ValueError, match='neither a train.py checkpoint nor an encoder file'):
        checkpoints.load_encoder(str(tmp_path / 'other.pt'))
