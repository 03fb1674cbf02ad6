"""Tests for probe.py: the probe learns a separable toy problem, segments x views shapes and view
averaging, the pixel floor (--pixels) and the supervised ceiling (--supervised) on toy tasks, and
short end-to-end runs on synthetic clips in every mode (CPU, well under a minute)."""
import json
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import attentive_probe  # noqa: E402
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
    train = probe.CachedFeatures(*toy_features(384, 4, generator), batch_size=32, shuffle=True)
    val = probe.CachedFeatures(*toy_features(256, 4, generator, views=2), batch_size=32, shuffle=False)
    grid = [(1e-3, 0.01), (3e-4, 0.1)]
    history = attentive_probe.train_probes(train, val, dim=32, classes=4, heads=4, epochs=4, device=torch.device('cpu'), grid=grid)
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
    tokens = probe.encode(MeanEncoder(), clips, layers=2, chunk=5)
    assert tokens.shape == (B, V, S * N, 2 * MeanEncoder.dim)
    # segment s of view v of video b holds value (b*V + v)*S + s, its N tokens in segment order
    for b in range(B):
        for v in range(V):
            expected = torch.tensor([((b * V + v) * S + s) * (n + 1) for s in range(S) for n in range(N)], dtype=torch.float)
            assert torch.equal(tokens[b, v, :, 0], expected)

    real = probe.encode(Encoder(dim=32, depth=1, heads=2, patch=8).eval(), torch.randn(B, V, S, 3, 4, 16, 16), 1, chunk=7)
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
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"top1: {result['top1']:.2f}"
    saved = json.loads(out.read_text())
    assert saved['top1'] == result['top1'] and 0 <= saved['top1'] <= 100 and saved['mode'] == 'frozen'
    assert len(saved['probes']) == len(probe.PRESETS['synthetic']['grid']) and len(saved['probes'][0]['val_top1']) == 1
    assert saved['args']['frames'] == 8 and saved['args']['segments'] == 1 and saved['args']['label'] == 'direction'


def write_video(path, brightness, frames=24, width=48, height=32):
    with av.open(str(path), 'w') as container:
        stream = container.add_stream('mpeg4', rate=12)
        stream.width, stream.height, stream.pix_fmt = width, height, 'yuv420p'
        for t in range(frames):
            image = np.full((height, width, 3), brightness + t, np.uint8)
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
    labels = probe.EncodedVideos([(torch.zeros(1), 7)], 1, 1, lambda clips: clips, classes=5, train=False, num_workers=0)
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
    encode_clips = lambda clips: probe.encode(encoder, clips, 1, chunk=64)
    train_batches = probe.cache(probe.EncodedVideos(train, len(train), 32, encode_clips, 4, False, 0), True, 'train')
    val_batches = probe.cache(probe.EncodedVideos(val, len(val), 32, encode_clips, 4, False, 0), False, 'val')
    history = attentive_probe.train_probes(train_batches, val_batches, dim, 4, heads=4, epochs=epochs,
                                           device=torch.device('cpu'), grid=[(1e-2, 0.01), (3e-3, 0.01)])
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
    train_batches = probe.EncodedVideos(train, len(train), 32, lambda clips: clips, 4, False, 0)
    val_batches = probe.EncodedVideos(val, len(val), 32, lambda clips: probe.encode(encoder, clips, 1, chunk=64), 4,
                                      False, 0)
    record = probe.train_supervised(encoder, train_batches, val_batches, classes=4, heads=4, epochs=4, lr=1e-2,
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
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"top1: {result['top1']:.2f}"
    saved = json.loads((tmp_path / f'{prefix}_tiny_shape.json').read_text())
    assert saved['mode'] == result['mode'] == mode and saved['top1'] == result['top1']
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
    config, pretraining = dict(dim=48, depth=1, heads=2, patch=4), dict(size='s', frames=4, resolution=16, fps=2.0)
    torch.save(dict(encoder_config=config, args=pretraining), tmp_path / 'ckpt.pt')
    args = probe.get_args(['--pixels', '--ckpt', str(tmp_path / 'ckpt.pt')])
    pixels = probe.load_encoder(args)
    assert (pixels.patch, pixels.tubelet, pixels.dim, args.size, args.frames, args.resolution) == (4, 2, 48, 's', 4, 16)


def test_a_list_naming_a_missing_file_exits_with_its_message(tmp_path):
    (tmp_path / 'train.txt').write_text('gone.mp4 0\n')
    (tmp_path / 'val.txt').write_text('gone.mp4 0\n')
    with pytest.raises(SystemExit, match='missing'):
        probe.main(['--random_init', '--train', str(tmp_path / 'train.txt'), '--val', str(tmp_path / 'val.txt'),
                    '--out', str(tmp_path / 'r.json')])
