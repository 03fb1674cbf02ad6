"""Tests for probe.py: the probe learns a separable toy problem, segments x views shapes and view
averaging, the pixel floor (--pixels) and the supervised ceiling (--supervised) on toy tasks, short
end-to-end runs on synthetic clips in every mode; under torchrun (gloo) 2 ranks train the heads one
process trains and 3 ranks count every validation video once; the probe file resumes and --eval_only
reproduces its accuracy; SSv2's training views are never mirrored (CPU, about a minute)."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import attentive_probe  # noqa: E402
import checkpoints  # noqa: E402
import probe  # noqa: E402
from encoder import Encoder  # noqa: E402


def toy_features(n, classes, generator, tokens=8, dim=32, views=1):
    """Tokens (n, views, tokens, dim) whose mean carries a class direction, buried in unit noise."""
    directions = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    directions = 1.5 * directions / directions.norm(dim=-1, keepdim=True)
    labels = torch.randint(classes, (n,), generator=generator)
    noise = torch.randn(n, views, tokens, dim, generator=generator)
    return directions[labels][:, None, None] + noise, labels


def test_probe_learns_separable_features():
    generator = torch.Generator().manual_seed(1)
    train = attentive_probe.CachedFeatures(*toy_features(384, 4, generator), batch_size=32, shuffle=True)
    val = attentive_probe.CachedFeatures(*toy_features(256, 4, generator, views=2), batch_size=32, shuffle=False)
    grid = [(1e-3, 0.01), (3e-4, 0.1)]
    heads = attentive_probe.ProbeGrid(grid, dim=32, heads=4, classes=4, total_steps=4 * len(train), device='cpu')
    history = attentive_probe.train_probes(train, val, heads, epochs=4)
    assert [(record['lr'], record['weight_decay']) for record in history] == grid
    assert all(len(record['val_top1']) == 4 and len(record["train_top1"]) == 4 for record in history)
    best = max(record['val_top1'][-1] for record in history)
    assert best >= 95, history


class MeanEncoder(torch.nn.Module):
    """A fake encoder: N = 2 tokens per clip, every channel the clip's mean (times the token number)."""

    dim = 3

    def forward(self, video, last=1):
        mean = video.mean(dim=(1, 2, 3, 4))  # (B,)
        return mean[:, None, None] * torch.arange(1, 3.0)[None, :, None] * torch.ones(1, 1, self.dim * last)


def test_segments_and_views_shapes():
    B, V, S, N = 2, 3, 4, 2
    clips = torch.arange(B * V * S, dtype=torch.float)[:, None, None, None, None].expand(-1, 3, 2, 8, 8)
    clips = rearrange(clips, '(b v s) c f h w -> b v s c f h w', b=B, v=V)
    tokens = attentive_probe.encode(MeanEncoder(), clips, layers=2, chunk=5, dtype='fp32')
    assert tokens.shape == (B, V, S * N, 2 * MeanEncoder.dim)
    # segment s of view v of video b holds value (b*V + v)*S + s, its N tokens in segment order
    for b in range(B):
        for v in range(V):
            expected = torch.tensor([((b * V + v) * S + s) * (n + 1) for s in range(S) for n in range(N)], dtype=torch.float)
            assert torch.equal(tokens[b, v, :, 0], expected)

    real = attentive_probe.encode(Encoder(dim=32, depth=1, heads=2, patch=8).eval(), torch.randn(B, V, S, 3, 4, 16, 16), 1,
                                  chunk=7, dtype='fp32')
    assert real.shape == (B, V, S * 2 * 4, 32)  # N = 2 slots x 2 x 2 patches per segment


def test_softmax_is_averaged_over_views():
    torch.manual_seed(0)
    head = attentive_probe.AttentiveProbe(dim=32, heads=16, classes=5).eval()
    tokens = torch.randn(4, 3, 10, 32)  # (B, V, L, D)
    probabilities = attentive_probe.predict(head, tokens)
    assert probabilities.shape == (4, 5)
    per_view = torch.stack([head(tokens[:, v]).softmax(-1) for v in range(3)], dim=1)  # (B, V, classes)
    torch.testing.assert_close(probabilities, per_view.mean(1))
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(4))


def test_end_to_end_random_init(tmp_path, capsys):
    out = tmp_path / 'probe.json'
    result = probe.main(['--random_init', '--size', 'tiny', '--resolution', '32', '--train_size', '64',
                         '--val_size', '32', '--epochs', '1', '--batch_size', '32', '--out', str(out)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"top1: {result['val_top1_best_of_grid']:.2f} (the best of 2 head(s)")
    assert 'chosen on the validation set it is measured on' in last
    saved = json.loads(out.read_text())
    top1 = saved['val_top1_best_of_grid']
    assert top1 == result['val_top1_best_of_grid'] and 0 <= top1 <= 100 and saved['mode'] == 'frozen'
    assert top1 == max(record['val_top1'][-1] for record in saved['probes']) and 'no held-out split' in saved['selection']
    assert len(saved['probes']) == len(probe.PRESETS['synthetic']['grid']) and len(saved['probes'][0]['val_top1']) == 1
    assert saved['args']['frames'] == 8 and saved['args']['segments'] == 1 and saved['args']['label'] == 'direction'


def write_video(path, brightness, frames=24, width=48, height=32, ramp=0):
    """A clip that brightens by 1 a frame, and by `ramp` a column from left to right."""
    with av.open(str(path), 'w') as container:
        stream = container.add_stream('mpeg4', rate=12)
        stream.width, stream.height, stream.pix_fmt = width, height, 'yuv420p'
        for t in range(frames):
            row = np.clip(brightness + t + ramp * np.arange(width), 0, 255)
            image = np.broadcast_to(row[None, :, None], (height, width, 3)).astype(np.uint8).copy()
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format='rgb24')):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize('cache', [False, True])
def test_video_list_with_k400_preset(tmp_path, cache):
    """The file path: a "path label" list, Table 10's k400 preset (8 segments x 3 views), flags overriding it."""
    lines = []
    for k in range(4):
        write_video(tmp_path / f'{k}.mp4', brightness=40 + 120 * (k % 2))
        lines.append(f'{k}.mp4 {k % 2}')
    (tmp_path / 'list.txt').write_text('\n'.join(lines))
    out = tmp_path / 'probe.json'
    argv = ['--random_init', '--preset', 'k400', '--train', str(tmp_path / 'list.txt'), '--val', str(tmp_path / 'list.txt'),
            '--frames', '4', '--resolution', '16', '--batch_size', '3', '--epochs', '1', '--out', str(out)]
    result = probe.main(argv + ['--cache'] * cache)
    assert (result['args']['segments'], result['args']['views'], result['args']['fps']) == (8, 3, 4.0)
    assert len(result['probes'][0]['val_top1']) == 1 and out.exists()


def test_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match='python train.py'):
        probe.main(['--ckpt', str(tmp_path / 'missing.pt')])
    with pytest.raises(SystemExit):
        probe.get_args(['--train', 'a.txt'])  # --val missing
    with pytest.raises(SystemExit):
        probe.get_args(['--size', 'tiny'])  # --size without --random_init
    (tmp_path / 'videos').mkdir()
    (tmp_path / 'videos' / 'a.mp4').write_bytes(b'')
    with pytest.raises(SystemExit, match='unlabeled'):
        probe.main(['--random_init', '--train', str(tmp_path / 'videos'), '--val', str(tmp_path / 'videos')])
    labels = attentive_probe.EncodedVideos([(torch.zeros(1), 7)], 1, 1, lambda clips: clips, classes=5, train=False,
                                           num_workers=0)
    with pytest.raises(ValueError, match='label 7 is out of range'):
        list(labels.epoch(0))


def test_pooled_attention_equals_projected_attention():
    torch.manual_seed(0)
    head = attentive_probe.AttentiveProbe(dim=48, heads=4, classes=3)
    for p in head.parameters():  # leave the init (zero biases) so biases are tested too
        p.data.normal_(0, 0.3)
    tokens = torch.randn(5, 17, 48)
    normed = head.norm_tokens(tokens)  # the usual way: project every token, then attend
    split = lambda x: rearrange(x, 'b l (h d) -> b h l d', h=4)
    query = head.q(head.query).expand(5, 1, -1)
    out = torch.nn.functional.scaled_dot_product_attention(split(query), split(head.k(normed)), split(head.v(normed)))
    x = head.query + head.proj(rearrange(out, 'b h 1 d -> b (h d)'))
    expected = head.classifier(head.norm_out(x + head.mlp(head.norm_mlp(x))))
    torch.testing.assert_close(head(tokens), expected, atol=1e-5, rtol=1e-4)


# -----------------------------------------------------------------------------
# --pixels and --supervised


class ToyClips(torch.utils.data.Dataset):
    """n clips (1, 1, 3, 2, res, res) as the repo's datasets give them (one view, one segment), and labels."""

    def __init__(self, clips, labels):
        self.clips, self.labels, self.num_classes = clips[:, None, None], labels, int(labels.max()) + 1

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.clips[i], self.labels[i].item()


def frozen_probe_top1(encoder, train, val, dim, epochs):
    """train_probes on an encoder's cached tokens, as main() does: the best final val top-1."""
    encode_clips = lambda clips: attentive_probe.encode(encoder, clips, 1, chunk=64, dtype='fp32')
    train_batches = attentive_probe.cache(attentive_probe.EncodedVideos(train, len(train), 32, encode_clips, 4, False, 0),
                                          True, 'train')
    val_batches = attentive_probe.cache(attentive_probe.EncodedVideos(val, len(val), 32, encode_clips, 4, False, 0),
                                        False, 'val')
    heads = attentive_probe.ProbeGrid([(1e-2, 0.01), (3e-3, 0.01)], dim, 4, 4, epochs * len(train_batches), 'cpu')
    history = attentive_probe.train_probes(train_batches, val_batches, heads, epochs)
    return max(record['val_top1'][-1] for record in history)


def test_pixel_tokens_shape_order_and_fixed_map():
    video = torch.randn(2, 3, 4, 16, 24)
    encoder = Encoder(dim=32, depth=1, heads=2, patch=8).eval()
    pixels = attentive_probe.PixelTokens(patch=8, tubelet=2, dim=32, seed=3)
    assert pixels(video).shape == encoder(video).shape == (2, 2 * 2 * 3, 32)  # (B, N, D), N = T x h x w
    assert list(pixels.parameters()) == [] and pixels.num_params() == 2 * 8 * 8 * 3 * 32  # a buffer: nothing trains
    torch.testing.assert_close(pixels.weight.std(), torch.tensor((2 * 8 * 8 * 3) ** -0.5), rtol=0.05, atol=0)
    assert torch.equal(pixels(video), attentive_probe.PixelTokens(8, 2, 32, seed=3)(video))  # same seed, same map
    assert not torch.allclose(pixels(video), attentive_probe.PixelTokens(8, 2, 32, seed=4)(video))
    # with the encoder's patch embedding as its map, the same tokens in the same order: the Conv3d's
    pixels.weight = rearrange(encoder.embed.weight.detach(), 'd c t h w -> (t h w c) d')
    expected = rearrange(encoder.embed(video), 'b d t h w -> b (t h w) d')
    torch.testing.assert_close(pixels(video), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match='one layer'):
        pixels(video, last=2)


def test_pixels_read_the_mean_colour():
    """The floor reads what the pixels show: 4 classes by the clip's mean colour, under unit pixel noise."""
    generator = torch.Generator().manual_seed(0)
    colours = 0.5 * torch.tensor([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, 1.0]])
    def toy(n):
        labels = torch.randint(4, (n,), generator=generator)
        noise = torch.randn(n, 3, 2, 16, 16, generator=generator)
        return ToyClips(colours[labels][:, :, None, None, None] + noise, labels)
    pixels = attentive_probe.PixelTokens(patch=8, tubelet=2, dim=32, seed=0)
    assert frozen_probe_top1(pixels, toy(256), toy(256), dim=32, epochs=4) >= 90
    assert torch.equal(pixels.weight, attentive_probe.PixelTokens(8, 2, 32, seed=0).weight)  # the probe left the map as it was


def test_supervised_learns_what_the_frozen_encoder_cannot_see():
    """The label is one of 4 faint patterns, tiled in every 8x8 patch under unit noise, that lie in the
    null space of the random encoder's patch embedding: the frozen encoder's tokens hold no trace of
    them (the probe sits at chance), so only training the encoder, from that same init, can read them."""
    torch.manual_seed(0)
    encoder = Encoder(dim=32, depth=1, heads=2, patch=8)
    init = {name: value.clone() for name, value in encoder.state_dict().items()}
    embedding = rearrange(encoder.embed.weight.detach(), 'd c t h w -> d (c t h w)')  # (32, 384)
    patterns = torch.randn(4, 384, generator=torch.Generator().manual_seed(1))
    patterns -= patterns @ torch.linalg.pinv(embedding) @ embedding  # the part the embedding maps to 0
    patterns /= patterns.pow(2).mean(1, keepdim=True).sqrt()
    assert (patterns @ embedding.T).abs().max() < 1e-4
    patterns = rearrange(patterns, 'k (c t h w) -> k c t h w', c=3, t=2, h=8).repeat(1, 1, 1, 2, 2)  # (4, 3, 2, 16, 16)
    generator = torch.Generator().manual_seed(2)
    def toy(n):
        labels = torch.randint(4, (n,), generator=generator)
        return ToyClips(0.4 * patterns[labels] + torch.randn(n, 3, 2, 16, 16, generator=generator), labels)
    train, val = toy(256), toy(256)

    frozen = frozen_probe_top1(encoder.eval().requires_grad_(False), train, val, dim=32, epochs=4)
    encoder.load_state_dict(init)
    encoder.requires_grad_(True)
    train_batches = attentive_probe.EncodedVideos(train, len(train), 32, lambda clips: clips, 4, False, 0)
    val_batches = attentive_probe.EncodedVideos(val, len(val), 32, lambda clips: attentive_probe.encode(
        encoder, clips, 1, chunk=64, dtype='fp32'), 4, False, 0)
    record = attentive_probe.train_supervised(encoder, train_batches, val_batches, classes=4, heads=4, epochs=4, lr=1e-2,
                                              weight_decay=0.01)
    assert (record['lr'], record['encoder_lr'], record['weight_decay']) == (1e-2, 1e-3, 0.01)
    assert len(record['train_top1']) == len(record['val_top1']) == 4 and not encoder.training
    assert frozen <= 40, frozen  # chance is 25
    assert record['val_top1'][-1] >= 90 and record['val_top1'][-1] >= frozen + 25, (frozen, record)
    assert not torch.equal(encoder.embed.weight, init['embed.weight'])


@pytest.mark.parametrize('flag, mode, prefix', [('--random_init', 'frozen', 'probe_random'),
                                                ('--pixels', 'pixels', 'probe_pixels'),
                                                ('--supervised', 'supervised', 'probe_supervised')])
def test_end_to_end_modes(tmp_path, capsys, flag, mode, prefix):
    """Each mode's `mode` field and default JSON name, next to --ckpt (not read: --size says the architecture)."""
    result = probe.main([flag, '--size', 'tiny', '--ckpt', str(tmp_path / 'ckpt.pt'), '--label', 'shape',
                         '--frames', '4', '--resolution', '32', '--train_size', '16', '--val_size', '8', '--epochs', '1',
                         '--batch_size', '8'])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"top1: {result['val_top1_best_of_grid']:.2f} ")
    saved = json.loads((tmp_path / f'{prefix}_tiny_shape.json').read_text())
    assert saved['mode'] == result['mode'] == mode and saved['val_top1_best_of_grid'] == result['val_top1_best_of_grid']
    assert saved['args']['train_size'] == 16 and len(saved['probes'][0]['val_top1']) == 1
    grid = probe.PRESETS['synthetic']['grid']
    assert len(saved['probes']) == (1 if mode == 'supervised' else len(grid))
    if mode == 'supervised':
        assert saved['probes'][0]['lr'] == grid[0][0] and saved['probes'][0]['encoder_lr'] == grid[0][0] / 10


def test_supervised_default_train_size_and_pixels_arguments(tmp_path, monkeypatch, capsys):
    """--supervised on synthetic clips without --train_size: SUPERVISED_TRAIN_SIZE clips, the same every epoch,
    said and recorded (train_supervised stubbed: only the arguments are checked)."""
    seen = {}
    def stub(encoder, train_batches, val_batches, *args):
        seen.update(size=train_batches.size, train=train_batches.train, encoder=encoder.training)
        return dict(lr=1e-2, weight_decay=0.01, train_top1=[0.0], val_top1=[0.0])
    monkeypatch.setattr(probe, 'train_supervised', stub)
    result = probe.main(['--supervised', '--size', 'tiny', '--resolution', '32', '--val_size', '8',
                         '--out', str(tmp_path / 'probe.json')])
    assert seen == dict(size=probe.SUPERVISED_TRAIN_SIZE, train=False, encoder=True)
    assert result['args']['train_size'] == probe.SUPERVISED_TRAIN_SIZE == 1000
    assert f'{probe.SUPERVISED_TRAIN_SIZE} synthetic training clips' in capsys.readouterr().out

    with pytest.raises(SystemExit):
        probe.get_args(['--pixels', '--layers', '2'])  # one "layer"
    with pytest.raises(SystemExit):
        probe.get_args(['--pixels', '--supervised'])
    assert probe.get_args(['--pixels', '--preset', 'diving48']).layers == 1  # over the preset's 4
    # from a checkpoint: its patch, width and clip settings, not --size's
    encoder = Encoder(dim=48, depth=1, heads=2, patch=4)
    pretraining = dict(size='s', frames=4, resolution=16, fps=2.0)
    torch.save(checkpoints.encoder_file(encoder.state_dict(), encoder.config, pretraining, step=0), tmp_path / 'encoder.pt')
    args = probe.get_args(['--pixels', '--ckpt', str(tmp_path / 'encoder.pt')])
    pixels = probe.build_encoder(args)
    assert (pixels.patch, pixels.tubelet, pixels.dim, args.size, args.frames, args.resolution) == (4, 2, 48, 's', 4, 16)


def test_a_list_naming_a_missing_file_exits_with_its_message(tmp_path):
    (tmp_path / 'train.txt').write_text('gone.mp4 0\n')
    (tmp_path / 'val.txt').write_text('gone.mp4 0\n')
    with pytest.raises(SystemExit, match='missing'):
        probe.main(['--random_init', '--train', str(tmp_path / 'train.txt'), '--val', str(tmp_path / 'val.txt'),
                    '--out', str(tmp_path / 'r.json')])


# -----------------------------------------------------------------------------
# torchrun, the probe file, --eval_only, views

ROOT = str(Path(__file__).resolve().parent.parent)
# a k400-shaped probe small enough for a CPU: 2 segments x 2 views of 4 frames at 16 px, batches of 3
# videos (on 2 ranks shares of 2 and 1), the 6 heads of the grid, fp32 so that numbers compare
SMALL = ['--random_init', '--size', 'tiny', '--preset', 'k400', '--segments', '2', '--views', '2', '--frames', '4',
         '--resolution', '16', '--batch_size', '3', '--epochs', '2', '--dtype', 'fp32']


@pytest.fixture(scope='module')
def videos(tmp_path_factory):
    """Labelled lists of brightness-ramped videos: train.txt and val.txt (5 each), val7.txt (7)."""
    folder = tmp_path_factory.mktemp('videos')
    for k in range(9):
        write_video(folder / f'{k}.mp4', brightness=20 + 120 * (k % 2) + 2 * k, ramp=2)
    for name, numbers in (('train', range(5)), ('val', range(4, 9)), ('val7', range(2, 9))):
        (folder / f'{name}.txt').write_text(''.join(f'{k}.mp4 {k % 2}\n' for k in numbers))
    return folder


@pytest.fixture(scope='module')
def one_rank(videos):
    """SMALL trained in this process on train.txt, validated on val.txt: (its JSON's path, the JSON)."""
    out = videos / 'one' / 'probe.json'
    probe.main(SMALL + ['--train', str(videos / 'train.txt'), '--val', str(videos / 'val.txt'), '--out', str(out)])
    return out, json.loads(out.read_text())


def torchrun(ranks, flags):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={ranks}', 'probe.py', *flags]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def heads(path):
    return torch.load(path, weights_only=True)['heads']


def test_two_ranks_train_the_heads_one_process_trains(videos, one_rank):
    """Uneven shares (batches of 3 and 2 videos on 2 ranks), the encoder in the loop, augmented views."""
    one_out, one = one_rank
    out = videos / 'two' / 'probe.json'
    stdout = torchrun(2, SMALL + ['--train', str(videos / 'train.txt'), '--val', str(videos / 'val.txt'), '--out', str(out)])
    two = json.loads(out.read_text())
    assert stdout.count('top1: ') == 1 and '2 rank(s)' in stdout  # rank 0 alone prints
    assert [r['val_top1'] for r in two['probes']] == [r['val_top1'] for r in one['probes']]
    assert [r['train_top1'] for r in two['probes']] == [r['train_top1'] for r in one['probes']]
    assert two['val_top1_best_of_grid'] == one['val_top1_best_of_grid']
    one_heads, two_heads = heads(one_out.with_suffix('.pt')), heads(out.with_suffix('.pt'))
    for saved_one, saved_two, initial in zip(one_heads['probes'], two_heads['probes'], probe_init(one)):
        # float rounding (partial sums, AdamW normalising gradients that nearly cancel) moves a few weights
        # by up to ~3e-4; weighting the two ranks' means equally instead of by their shares moves them by ~5e-2
        for name, value in saved_one.items():
            torch.testing.assert_close(saved_two[name], value, rtol=0, atol=2e-3)
        # trained heads are compared: all has moved from the init but the key bias (the softmax ignores it)
        assert [name for name, value in saved_one.items() if torch.equal(value, initial[name])] == ['k.bias']


def probe_init(saved):
    """The heads' init of a saved probe (ProbeGrid draws them from the seed)."""
    grid = [tuple(x) for x in saved['args']['grid']]
    init = attentive_probe.ProbeGrid(grid, 192, 16, 2, 1, 'cpu', saved['args']['seed'])
    return [p.state_dict() for p in init.probes]


def test_every_validation_video_is_counted_once_on_three_ranks(videos, one_rank):
    """--eval_only of the saved heads on 7 videos: 3 ranks count 7 videos and get one process's top-1."""
    flags = SMALL + ['--train', str(videos / 'train.txt'), '--val', str(videos / 'val7.txt'), '--out', str(one_rank[0]),
                     '--eval_only']
    alone = probe.main(flags)
    stdout = torchrun(3, flags)
    last = stdout.strip().splitlines()[-1]
    assert re.match(rf"top1: {alone['top1_of_chosen_head']:.2f} on 7 videos of ", last), last
    assert alone['val_videos'] == 7
    for top1 in alone['val_top1']:
        assert f'val top-1 {top1:.2f}' in stdout


@pytest.mark.parametrize('size, batch_size, world', [(7, 3, 3), (7, 2, 3), (5, 3, 2), (9, 4, 2), (2, 4, 3)])
def test_ranks_share_every_batch_without_overlap(monkeypatch, size, batch_size, world):
    """The shares of all ranks make up each global batch of one process exactly, encoded or cached."""
    dataset = [(torch.tensor([float(i)]), i % 2) for i in range(size)]
    def batches(rank, ranks, cached):
        monkeypatch.setattr(attentive_probe, 'rank_and_world', lambda: (rank, ranks))
        videos = attentive_probe.EncodedVideos(dataset, size, batch_size, lambda clips: clips, 2, False, 0)
        if cached:
            return list(attentive_probe.cache(videos, True, 'test').epoch(3))  # a shuffled epoch
        return list(videos.epoch(0))
    for cached in (False, True):
        whole = batches(0, 1, cached)
        shares = [batches(rank, world, cached) for rank in range(world)]
        for b, (tokens, labels, videos) in enumerate(whole):
            parts = [share[b] for share in shares]
            assert all(count == videos == len(labels) for _, _, count in parts)  # every rank knows the batch's size
            held = sorted(value for part, _, _ in parts if part is not None for value in part.flatten().tolist())
            assert held == sorted(tokens.flatten().tolist())  # the same videos, each on one rank
            assert sum(len(part_labels) for _, part_labels, _ in parts) == len(labels)
        assert len(whole) == len(shares[0]) == -(-size // batch_size)


def test_eval_only_reproduces_the_saved_accuracy(videos, one_rank):
    out, saved = one_rank
    result = probe.main(SMALL + ['--train', str(videos / 'train.txt'), '--val', str(videos / 'val.txt'), '--out', str(out),
                                 '--eval_only'])
    assert result['val_top1'] == [record['val_top1'][-1] for record in saved['probes']]
    assert result['top1_of_chosen_head'] == saved['val_top1_best_of_grid'] and result['val_videos'] == 5
    assert saved['val_top1_best_of_grid'] == saved['probes'][saved['best_head']]['val_top1'][-1]
    assert (saved['best_lr'], saved['best_weight_decay']) == tuple(saved['args']['grid'][saved['best_head']])


# synthetic clips, cached: 48 training and 24 validation clips of 4 frames at 32 px, 3 epochs of 3 batches
SYNTHETIC = ['--random_init', '--size', 'tiny', '--frames', '4', '--resolution', '32', '--train_size', '48',
             '--val_size', '24', '--batch_size', '16', '--epochs', '3']


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    """SYNTHETIC run through in one go: (its result, its probe file)."""
    out = tmp_path_factory.mktemp('straight') / 'probe.json'
    return probe.main(SYNTHETIC + ['--out', str(out)]), out.with_suffix('.pt')


def test_a_stopped_probe_resumes_to_the_same_heads(tmp_path, capsys, straight):
    straight, straight_file = straight
    out = tmp_path / 'split.json'
    assert probe.main(SYNTHETIC + ['--out', str(out), '--stop_at', '1']) is None
    assert 'stopped after epoch 1 of 3' in capsys.readouterr().out and not out.exists()
    kept = torch.load(out.with_suffix('.pt'), weights_only=True)
    assert kept['epochs_done'] == 1 and len(kept['probes'][0]['val_top1']) == 1
    resumed = probe.main(SYNTHETIC + ['--out', str(out)])  # the same command again: epochs 2 and 3
    printed = capsys.readouterr().out
    assert 'epoch 1:' not in printed and 'epoch 2:' in printed and 'epoch 3:' in printed
    assert resumed['probes'] == straight['probes'] and resumed['epochs_done'] == 3
    for name in ('probes', 'optimizers'):
        for split_state, straight_state in zip(heads(out.with_suffix('.pt'))[name], heads(straight_file)[name]):
            torch.testing.assert_close(split_state, straight_state, rtol=0, atol=0)
    again = probe.main(SYNTHETIC + ['--out', str(out)])  # finished: nothing left to train, the same result
    assert again['probes'] == straight['probes']
    with pytest.raises(SystemExit, match=r'other settings: --epochs 4 \(the probe\'s: 3\)'):
        probe.main(SYNTHETIC + ['--out', str(out), '--epochs', '4'])
    # the cached probe's heads on clips encoded on the fly: the saved accuracy again
    evaluated = probe.main(SYNTHETIC + ['--out', str(out), '--eval_only'])
    assert evaluated['top1_of_chosen_head'] == straight['val_top1_best_of_grid']
    with pytest.raises(SystemExit, match='no probe file'):
        probe.main(SYNTHETIC + ['--out', str(tmp_path / 'never.json'), '--eval_only'])


def test_a_probe_stopped_by_a_signal_exits_143_and_continues(tmp_path, monkeypatch, straight):
    """SIGTERM in the middle of epoch 2 (of 3 batches an epoch): the epoch in flight is dropped, the
    process exits with train.py's status 143, and the same command trains epochs 2 and 3 as if never stopped."""
    straight, straight_file = straight
    class SignalInStep4(probe.StopSignal):
        asked = 0
        def requested(self, device):
            SignalInStep4.asked += 1
            if SignalInStep4.asked == 4:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().requested(device)
    monkeypatch.setattr(probe, 'StopSignal', SignalInStep4)
    out = tmp_path / 'stopped.json'
    with pytest.raises(SystemExit) as stopped:
        probe.main(SYNTHETIC + ['--out', str(out)])
    assert stopped.value.code == 143 and SignalInStep4.asked == 4
    assert torch.load(out.with_suffix('.pt'), weights_only=True)['epochs_done'] == 1
    monkeypatch.undo()
    assert probe.main(SYNTHETIC + ['--out', str(out)])['probes'] == straight['probes']
    for split_state, straight_state in zip(heads(out.with_suffix('.pt'))['probes'], heads(straight_file)['probes']):
        torch.testing.assert_close(split_state, straight_state, rtol=0, atol=0)


def mirrored(clip):
    """Whether a (3, F, R, R) view of write_video's left-to-right ramp runs right to left."""
    return bool(clip[..., :clip.shape[-1] // 2].mean() > clip[..., clip.shape[-1] // 2:].mean())


def test_ssv2_training_views_are_never_mirrored(videos):
    def training_views(preset):
        args = probe.get_args(['--random_init', '--preset', preset, '--train', str(videos / 'train.txt'),
                               '--val', str(videos / 'val.txt'), '--frames', '4', '--resolution', '16'])
        probe.build_encoder(args)
        train_set, _ = probe.make_datasets(args)
        return [view for i in range(40) for view in train_set[i][0][0]]  # (segments, 3, F, R, R) of view 0
    assert not any(mirrored(clip) for clip in training_views('ssv2'))
    assert sum(mirrored(clip) for clip in training_views('in1k')) >= 10  # IN1K flips: the test sees a flip
    assert [name for name, preset in probe.PRESETS.items() if preset['flip']] == ['in1k']


def test_probe_reads_the_encoder_file_or_the_checkpoint(tmp_path):
    from test_checkpoints import save_run
    save_run(tmp_path)
    flags = ['--frames', '4', '--resolution', '32', '--train_size', '32', '--val_size', '16', '--batch_size', '16',
             '--epochs', '1']
    small = probe.main(flags + ['--ckpt', str(tmp_path / 'encoder.pt'), '--out', str(tmp_path / 'small.json')])
    full = probe.main(flags + ['--ckpt', str(tmp_path / 'ckpt.pt'), '--out', str(tmp_path / 'full.json')])
    assert small['probes'] == full['probes'] and small['args']['size'] == 'tiny'
    with pytest.raises(SystemExit, match='EMA encoder only'):
        probe.main(flags + ['--ckpt', str(tmp_path / 'encoder.pt'), '--weights', 'online'])
