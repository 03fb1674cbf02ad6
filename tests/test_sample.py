"""sample.py: generation and rollout write a PNG, a GIF and an MP4 with the expected frames and sizes."""
import os
from copy import deepcopy

import av
import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from checkpoints import save_checkpoint
from data import load_image_clip, make_dataset
from nextvid import NextVid

FRAMES, RESOLUTION = 8, 64  # the tiny recipe's clips


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    """An untrained tiny run, built as train.py builds it and saved as train.py saves it."""
    out_dir = tmp_path_factory.mktemp('run')
    args, _ = train.get_args([])
    torch.manual_seed(0)
    model = NextVid.build(**vars(args))
    torch.nn.init.normal_(model.decoder.out.weight, std=0.02)  # off adaLN-Zero's start: an x_hat of 0 would make every slot alike
    save_checkpoint(str(out_dir), model, deepcopy(model.encoder), torch.optim.AdamW(model.parameters()), 0, vars(args))
    return str(out_dir / 'ckpt.pt')


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / 'picture.png'
    pixels = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def tile_size(rows, columns, group):
    """(width, height) of sample.tile's picture of 64 x 64 cells."""
    cell = RESOLUTION * max(1, sample.DISPLAY // RESOLUTION) + sample.GAP
    return (sample.LABEL_WIDTH + columns * cell,
            2 * sample.HEADER + rows * cell + (rows - 1) // group * sample.GROUP_GAP)


def check_outputs(paths, png_size, gif_size, frames):
    png, gif, mp4 = paths
    assert png.endswith('.png') and gif.endswith('.gif') and mp4.endswith('.mp4')
    with Image.open(png) as image:
        assert image.size == png_size
    with Image.open(gif) as image:
        assert image.size == gif_size
        assert image.n_frames == frames
    with av.open(mp4) as container:
        decoded = list(container.decode(video=0))
    assert len(decoded) == frames
    assert (decoded[0].width, decoded[0].height) == tuple(size - size % 2 for size in gif_size)


def test_generation_writes_picture_gif_and_mp4(ckpt, tmp_path):
    paths = sample.main(['--ckpt', ckpt, '--out_dir', str(tmp_path), '--clips', '2', '--samples', '2', '--steps', '2'])
    # per clip: real, masked input, sample 1, sample 2; per frame a column. Animation: clips x those 4.
    check_outputs(paths, tile_size(2 * 4, FRAMES, group=4), tile_size(2, 4, group=1), FRAMES)


def test_generation_from_a_video_without_mask(ckpt, tmp_path):
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint['args']['no_mask'] = True
    torch.save(checkpoint, tmp_path / 'no_mask.pt')
    clip = make_dataset('synthetic', frames=2 * FRAMES, resolution=RESOLUTION, fps=4, train=False, seed=0)[0][0]
    sample.write_mp4([Image.fromarray(frame) for frame in sample.to_frames(clip)], str(tmp_path / 'clip.mp4'), fps=8)
    paths = sample.main(['--ckpt', str(tmp_path / 'no_mask.pt'), '--video', str(tmp_path / 'clip.mp4'),
                         '--out_dir', str(tmp_path / 'out'), '--steps', '1'])
    check_outputs(paths, tile_size(3, FRAMES, group=3), tile_size(1, 3, group=1), FRAMES)


def test_rollout_writes_the_grown_clip(ckpt, picture, tmp_path):
    paths = sample.main(['--ckpt', ckpt, '--image', picture, '--rollout', '2', '--out_dir', str(tmp_path), '--steps', '1'])
    # rows real and rollout, 3 slots = 6 frames
    check_outputs(paths, tile_size(2, 6, group=2), tile_size(1, 2, group=1), 6)


def test_rollout_starts_from_the_seed(ckpt, picture):
    encoder, predictor, decoder, _, _ = sample.load_models(ckpt, 'cpu')
    seed = load_image_clip(picture, 2, RESOLUTION)[None]  # (1, 3, 2, 64, 64): one slot
    grown = sample.rollout(encoder, predictor, decoder, seed, 2, 1, torch.Generator().manual_seed(0))
    assert grown.shape == (1, 3, 6, RESOLUTION, RESOLUTION)
    assert torch.equal(grown[:, :, :2], seed)
    assert not torch.equal(grown[:, :, 2:4], grown[:, :, 4:])


def test_rollout_placeholder_has_no_influence(ckpt):
    encoder, predictor, _, _, _ = sample.load_models(ckpt, 'cpu')
    past = torch.rand(1, 3, 4, RESOLUTION, RESOLUTION) * 2 - 1  # slots 0 and 1
    latents = []
    for placeholder in [torch.zeros(1, 3, 2, RESOLUTION, RESOLUTION), torch.randn(1, 3, 2, RESOLUTION, RESOLUTION)]:
        video = torch.cat([past, placeholder], dim=2)
        with torch.no_grad():
            latents.append(predictor(encoder(video), None, encoder.grid(video))[:, -64:])  # z of slot 2
    assert torch.allclose(latents[0], latents[1], atol=1e-5)


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(SystemExit, match='python train.py'):
        sample.main(['--ckpt', str(tmp_path / 'none.pt'), '--out_dir', str(tmp_path)])


def test_sample_uses_the_checkpoints_parameterisation(ckpt, tmp_path):
    checkpoint = torch.load(ckpt, weights_only=False)
    assert (checkpoint['args']['prediction'], checkpoint['args']['tau_sampling']) == ('x', 'logit_normal')  # tiny's, recorded
    assert sample.load_models(ckpt, 'cpu')[2].prediction == 'x'
    checkpoint['args']['prediction'] = 'v'
    torch.save(checkpoint, tmp_path / 'v.pt')
    assert sample.load_models(str(tmp_path / 'v.pt'), 'cpu')[2].prediction == 'v'
    del checkpoint['args']['prediction']  # a run from before --prediction: it was a velocity decoder
    torch.save(checkpoint, tmp_path / 'old.pt')
    assert sample.load_models(str(tmp_path / 'old.pt'), 'cpu')[2].prediction == 'v'


def test_generation_prints_the_next_frame_scores(ckpt, tmp_path, capsys):
    sample.main(['--ckpt', ckpt, '--out_dir', str(tmp_path), '--clips', '2', '--steps', '2'])
    line = next(line for line in capsys.readouterr().out.splitlines() if 'PSNR' in line)
    assert line.startswith('2 clip(s), next-frame PSNR') and all(name in line for name in ('generated', 'copy', 'mean colour'))


@pytest.mark.parametrize('flag', ['--video', '--image'])
def test_missing_or_undecodable_input_exits_with_its_message(ckpt, tmp_path, flag):
    with pytest.raises(SystemExit, match='nothing.mp4'):
        sample.main(['--ckpt', ckpt, flag, str(tmp_path / 'nothing.mp4'), '--out_dir', str(tmp_path)])
    (tmp_path / 'broken.mp4').write_bytes(b'not a video at all')
    with pytest.raises(SystemExit, match='broken.mp4'):
        sample.main(['--ckpt', ckpt, flag, str(tmp_path / 'broken.mp4'), '--out_dir', str(tmp_path)])


@pytest.fixture(scope='module')
def vae_ckpt(tmp_path_factory):
    """A 2-step --target vae run of train.py on 48 x 48 clips with a tiny random VAE (factor 2)."""
    from test_train import SMALL, write_vae
    directory = tmp_path_factory.mktemp('vae_run')
    weights, stats = write_vae(str(directory))
    train.train(SMALL + ['--target', 'vae', '--vae', weights, '--vae_stats', stats, '--steps', '1',
                         '--out_dir', str(directory / 'out')])
    return str(directory / 'out' / 'ckpt.pt'), weights


def test_vae_target_generation_and_rollout_decode_to_pixels(vae_ckpt, picture, tmp_path, capsys):
    ckpt, weights = vae_ckpt
    size = lambda rows, columns, group: (sample.LABEL_WIDTH + columns * (48 * 2 + sample.GAP),
                                         2 * sample.HEADER + rows * (48 * 2 + sample.GAP) + (rows - 1) // group * sample.GROUP_GAP)
    paths = sample.main(['--ckpt', ckpt, '--out_dir', str(tmp_path / 'g'), '--clips', '1', '--steps', '1'])
    check_outputs(paths, size(3, 4, group=3), size(1, 3, group=1), 4)  # real, masked input, generated; 4 frames
    assert 'next-frame PSNR' in capsys.readouterr().out
    paths = sample.main(['--ckpt', ckpt, '--image', picture, '--rollout', '1', '--out_dir', str(tmp_path / 'r'), '--steps', '1'])
    check_outputs(paths, size(2, 4, group=2), size(1, 2, group=1), 4)
    os.remove(weights)
    with pytest.raises(SystemExit, match='vae.pt'):  # the checkpoint names the VAE files it needs
        sample.load_models(ckpt, 'cpu')
