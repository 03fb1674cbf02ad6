"""Tests for probe.py: the probe learns a separable toy problem, segments x views shapes and view
averaging, and a short end-to-end run on synthetic clips (CPU, well under a minute)."""
import json
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
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
    history = probe.train_probes(train, val, dim=32, classes=4, heads=4, epochs=4, device=torch.device('cpu'), grid=grid)
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
    head = probe.AttentiveProbe(dim=32, heads=16, classes=5).eval()
    tokens = torch.randn(4, 3, 10, 32)  # (B, V, L, D)
    probabilities = probe.predict(head, tokens)
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
    assert saved['top1'] == result['top1'] and 0 <= saved['top1'] <= 100
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
    head = probe.AttentiveProbe(dim=48, heads=4, classes=3)
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
