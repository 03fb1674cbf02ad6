"""Tests for data.py and synthetic.py: synthetic clips, video lists, image folders, mixes and bad input (CPU, seconds)."""
import fractions
import re
import sys
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from einops import rearrange
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import synthetic  # noqa: E402
import video  # noqa: E402


def write_video(path, n_frames, fps=12, width=64, height=48):
    """An mpeg4 video: green = 10 * t + 5 (changes over time), red = a left-to-right ramp."""
    with av.open(str(path), 'w') as container:
        stream = container.add_stream('mpeg4', rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, 'yuv420p'
        for t in range(n_frames):
            image = np.full((height, width, 3), 128, np.uint8)
            image[..., 0] = np.linspace(0, 255, width).astype(np.uint8)
            image[..., 1] = 10 * t + 5
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format='rgb24')):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_list(path, lines):
    path.write_text(''.join(f'{line}\n' for line in lines))
    return path


def write_image_folder(root):
    """cat/ holds red pictures, dog/ blue ones, of different sizes."""
    for name, colour in (('cat', (220, 20, 20)), ('dog', (20, 20, 220))):
        (root / name).mkdir(parents=True)
        for k, size in enumerate(((40, 30), (30, 50))):
            Image.new('RGB', size, colour).save(root / name / f'{k}.png')
    return root


def green(clip):
    """Mean green level per frame of a (3, F, H, W) clip."""
    return clip[1].mean(dim=(-1, -2))


# ---------------------------------------------------------------- synthetic clips

def test_synthetic_shape_range_dtype_and_labels():
    dataset = data.make_dataset('synthetic', frames=8, resolution=64, fps=4, train=True, seed=0)
    assert dataset.num_classes == synthetic.DIRECTIONS == 8
    for i in range(4):
        clip, label = dataset[i]
        assert clip.shape == (3, 8, 64, 64) and clip.dtype == torch.float32
        assert clip.min() >= -1 and clip.max() <= 1 and clip.std() > 0.1
        assert isinstance(label, int) and 0 <= label < synthetic.DIRECTIONS
    shapes = data.make_dataset('synthetic', frames=8, resolution=64, fps=4, train=True, seed=0, label='shape')
    assert shapes.num_classes == synthetic.SHAPES >= 8


def test_synthetic_is_deterministic_in_seed_and_index():
    first = data.SyntheticClips(8, 64, seed=3)
    again = data.SyntheticClips(8, 64, seed=3)
    assert torch.equal(first[5][0], again[5][0])
    assert torch.equal(first[10 ** 12][0], again[10 ** 12][0])  # beyond len() is fine
    assert not torch.equal(first[5][0], first[6][0])
    assert not torch.equal(first[5][0], data.SyntheticClips(8, 64, seed=4)[5][0])


def test_label_argument_does_not_change_pixels_and_covers_all_classes():
    by_direction = data.SyntheticClips(4, 32, seed=1, label='direction')
    by_shape = data.SyntheticClips(4, 32, seed=1, label='shape')
    directions, shapes = set(), set()
    for i in range(100):
        (clip_d, direction), (clip_s, shape) = by_direction[i], by_shape[i]
        assert torch.equal(clip_d, clip_s)
        directions.add(direction)
        shapes.add(shape)
    assert directions == set(range(synthetic.DIRECTIONS)) and shapes == set(range(synthetic.SHAPES))
    with pytest.raises(ValueError, match='direction'):
        data.SyntheticClips(4, 32, seed=1, label='colour')


def test_shapes_are_distinct_silhouettes():
    masks = [synthetic.shape_mask(shape, 24) for shape in range(synthetic.SHAPES)]
    assert all(mask.sum() > 24 for mask in masks)
    for a in range(synthetic.SHAPES):
        for b in range(a):
            assert (masks[a] != masks[b]).sum() > 20, (synthetic.SHAPE_NAMES[a], synthetic.SHAPE_NAMES[b])


def estimate_direction(clip, step):
    """Direction (0..7) of the one moving object of a clip with a still background: its mask is
    where a frame differs from the per-pixel median over time; centroids use circular means."""
    video = clip.numpy()  # (3, F, R, R)
    size = video.shape[-1]
    background = np.median(video, axis=1)

    def centroid(t):
        ys, xs = np.nonzero(np.abs(video[:, t] - background).sum(0) > 0.1)
        circular_mean = lambda c: np.angle(np.exp(2j * np.pi * c / size).mean()) * size / (2 * np.pi)  # noqa: E731
        return circular_mean(ys), circular_mean(xs)

    (y0, x0), (y1, x1) = centroid(0), centroid(step)
    dy, dx = (y1 - y0 + size / 2) % size - size / 2, (x1 - x0 + size / 2) % size - size / 2
    return round(np.arctan2(-dy, dx) / (np.pi / 4)) % synthetic.DIRECTIONS  # rows grow downwards


def test_direction_label_matches_the_motion():
    dataset = data.SyntheticClips(96, 64, seed=7, distractors=0, camera_motion=0.0)
    for i in range(12):
        clip, direction = dataset[i]
        assert estimate_direction(clip, step=4) == direction, i


def changing_share(clip):
    """Share of pixels that differ between the first two frames."""
    return ((clip[:, 0] - clip[:, 1]).abs().sum(0) > 1e-3).float().mean().item()


def test_camera_motion_and_distractors_add_motion():
    still = [changing_share(data.SyntheticClips(4, 64, seed=2, distractors=0)[i][0]) for i in range(8)]
    panned = [changing_share(data.SyntheticClips(4, 64, seed=2, distractors=0, camera_motion=2.0)[i][0])
              for i in range(8)]
    busy = [changing_share(data.SyntheticClips(4, 64, seed=2, distractors=4)[i][0]) for i in range(8)]
    assert max(still) < 0.35 and min(panned) > 0.5
    assert np.mean(busy) > 1.5 * np.mean(still)  # four moving distractors


def test_synthetic_segments_and_views():
    dataset = data.SyntheticClips(4, 32, seed=0, segments=2, views=3)
    clip, _ = dataset[0]
    assert clip.shape == (3, 2, 3, 4, 32, 32)
    assert torch.equal(clip[0], clip[2])  # views are copies
    assert not torch.equal(clip[0, 0], clip[0, 1])  # the segments follow each other in time


# ---------------------------------------------------------------- videos

def test_video_list_decodes_clips(tmp_path):
    write_video(tmp_path / 'a.mp4', 24)
    (tmp_path / 'sub').mkdir()
    write_video(tmp_path / 'sub' / 'b.mp4', 24)
    listing = write_list(tmp_path / 'list.txt', ['a.mp4 0', f'{tmp_path / "sub" / "b.mp4"} 1'])
    train = data.make_dataset(str(listing), frames=8, resolution=32, fps=12, train=True, seed=0)
    assert len(train) == 2 and train.num_classes == 2
    assert sorted(train[i][1] for i in range(2)) == [0, 1]  # one epoch visits every file once
    clip, label = train[0]
    assert clip.shape == (3, 8, 32, 32) and clip.dtype == torch.float32
    assert clip.min() >= -1 and clip.max() <= 1
    assert (green(clip).diff() > 0.03).all()  # every frame brighter than the last (+10 levels)
    fresh = data.make_dataset(str(listing), frames=8, resolution=32, fps=12, train=True, seed=0)
    assert torch.equal(fresh[7][0], train[7][0])  # same random crop, flip and start
    assert not torch.equal(train[7][0], train[9][0])


def test_frames_are_sampled_at_the_asked_fps(tmp_path):
    listing = write_list(tmp_path / 'list.txt', ['a.mp4 0'])
    write_video(tmp_path / 'a.mp4', 24, fps=12)
    dataset = data.make_dataset(str(listing), frames=4, resolution=32, fps=6, train=False, seed=0)
    steps = green(dataset[0][0]).diff() * 127.5  # two source frames apart: +20 levels
    assert torch.allclose(steps, torch.full_like(steps, 20.0), atol=4)


def test_short_video_is_padded_with_its_last_frame(tmp_path):
    listing = write_list(tmp_path / 'list.txt', ['short.mp4 0'])
    write_video(tmp_path / 'short.mp4', 5)
    clip, _ = data.make_dataset(str(listing), frames=8, resolution=32, fps=12, train=False, seed=0)[0]
    assert not torch.equal(clip[:, 3], clip[:, 4])
    assert all(torch.equal(clip[:, 4], clip[:, t]) for t in range(5, 8))
    write_video(tmp_path / 'short.mp4', 6)  # frames 0..5 at half the rate: 0, 2, 4, then the final 5
    clip, _ = data.make_dataset(str(listing), frames=4, resolution=32, fps=6, train=False, seed=0)[0]
    assert 5 < (green(clip)[3] - green(clip)[2]) * 127.5 < 15


def test_eval_segments_and_views(tmp_path):
    listing = write_list(tmp_path / 'list.txt', ['a.mp4 0'])
    write_video(tmp_path / 'a.mp4', 24)
    dataset = data.make_dataset(str(listing), frames=4, resolution=32, fps=12, train=False, seed=0,
                                segments=2, views=3)
    clip, _ = dataset[0]
    assert clip.shape == (3, 2, 3, 4, 32, 32)
    red = clip[:, :, 0].mean(dim=(1, 2, 3, 4))  # per view: left, centre, right crop of a red ramp
    assert red[0] < red[1] < red[2]
    assert green(clip[0, 1]).mean() > green(clip[0, 0]).mean() + 0.5  # the later segment is brighter
    assert torch.equal(clip, dataset[0][0])
    single = data.make_dataset(str(listing), frames=4, resolution=32, fps=12, train=False, seed=0)[0][0]
    assert torch.allclose(single, data.load_video_clip(tmp_path / 'a.mp4', 4, 12, 32))


def test_video_folder_is_unlabeled(tmp_path):
    write_video(tmp_path / 'x.mp4', 6)
    (tmp_path / 'more').mkdir()
    write_video(tmp_path / 'more' / 'y.mp4', 6)
    dataset = data.make_dataset(str(tmp_path), frames=4, resolution=16, fps=12, train=True, seed=0)
    assert len(dataset) == 2 and dataset.num_classes == 0 and dataset[0][1] == -1


def test_missing_files_and_bad_lines(tmp_path):
    write_video(tmp_path / 'a.mp4', 6)
    listing = write_list(tmp_path / 'list.txt', ['a.mp4 0', 'missing.mp4 1'])
    with pytest.raises(FileNotFoundError, match=r'1 of 2 .*missing\.mp4'):
        data.make_dataset(str(listing), frames=4, resolution=16, fps=12, train=True, seed=0)
    bad = write_list(tmp_path / 'bad.txt', ['a.mp4 0', 'a.mp4 zero'])
    with pytest.raises(ValueError, match=r'bad\.txt, line 2'):
        data.make_dataset(str(bad), frames=4, resolution=16, fps=12, train=True, seed=0)
    with pytest.raises(FileNotFoundError):
        data.load_video_clip(tmp_path / 'nothing.mp4', 4, 12, 16)


def test_corrupt_file_is_skipped_with_one_warning(tmp_path):
    write_video(tmp_path / 'good.mp4', 6)
    (tmp_path / 'bad.mp4').write_bytes(np.random.default_rng(0).bytes(4000))
    listing = write_list(tmp_path / 'list.txt', ['good.mp4 0', 'bad.mp4 1'])
    dataset = data.make_dataset(str(listing), frames=4, resolution=16, fps=12, train=True, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        labels = [dataset[i][1] for i in range(8)]
    assert labels == [0] * 8
    assert len([w for w in caught if 'bad.mp4' in str(w.message)]) == 1
    with pytest.raises(ValueError, match='cannot decode'):
        data.load_video_clip(tmp_path / 'bad.mp4', 4, 12, 16)


def test_mostly_unreadable_data_raises(tmp_path):
    for k in range(3):
        (tmp_path / f'bad{k}.mp4').write_bytes(b'not a video' * 100)
    listing = write_list(tmp_path / 'list.txt', [f'bad{k}.mp4 0' for k in range(3)])
    dataset = data.make_dataset(str(listing), frames=4, resolution=16, fps=12, train=True, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(RuntimeError, match='could not be decoded'):
            dataset[0]


# ---------------------------------------------------------------- seeking

def old_read_video(path, frames, fps, places):
    """video.read_video before it seeked, verbatim but for the errors: the reference it must match."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        source_fps = float(stream.average_rate or 30)
        step = max(source_fps / fps, 1.0)  # source frames between two sampled frames
        span = round((frames - 1) * step) + 1  # source frames one clip covers
        length = stream.frames or max(1, round((container.duration or 0) / av.time_base * source_fps))
        starts = np.round(np.asarray(places) * max(length - span, 0))
        wanted = (starts[:, None] + np.round(np.arange(frames) * step)).astype(int)  # (clips, F)
        needed, last, frame, decoded = set(wanted.flat), wanted.max(), None, {}  # index -> (h, w, 3)
        for index, frame in enumerate(container.decode(stream)):
            if index in needed:
                decoded[index] = frame.to_ndarray(format='rgb24')
            if index == last:
                break
        else:  # the video ended before the last needed frame: those repeat its final frame
            decoded[index] = frame.to_ndarray(format='rgb24')
    final = max(decoded)
    pictures = np.stack([decoded[min(index, final)] for index in wanted.flat])
    return rearrange(pictures, '(s f) h w c -> s f h w c', s=len(places))


def write_coded_video(path, n_frames, gop, codec='libx264', times_ms=None, fmt=None):
    """Random pixels (every frame different) at 24 fps, a keyframe every `gop` frames (None: only
    the first). libx264 makes closed GOPs with B-frames, mpeg4 with B-frames open GOPs (B-frames
    after a keyframe in decode order, shown before it). times_ms: presentation times, for a
    variable frame rate."""
    rng = np.random.default_rng(n_frames)
    with av.open(str(path), 'w', format=fmt) as container:
        every = gop or 10 ** 6
        options = {'x264-params': f'keyint={every}:min-keyint={every}:scenecut=0'} if codec == 'libx264' else {}
        stream = container.add_stream(codec, rate=24, options=options)
        stream.width, stream.height, stream.pix_fmt = 64, 48, 'yuv420p'
        if codec == 'mpeg4':
            stream.codec_context.gop_size, stream.codec_context.max_b_frames = every, 2
        if times_ms is not None:
            stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for t in range(n_frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), format='rgb24')
            if times_ms is not None:
                frame.pts, frame.time_base = int(times_ms[t]), fractions.Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# (frames, fps) at 24 fps: every 4th frame, every frame, and a clip longer than the 96-frame video
CLIP_SHAPES = [(8, 6), (16, 24), (40, 6)]
PLACES = [[0.0], [0.5], [1.0], [0.05, 0.5, 0.95]]


def assert_same_as_decoding_from_start(path):
    before = video.fallbacks
    for frames, fps in CLIP_SHAPES:
        for places in PLACES:
            new, old = video.read_video(path, frames, fps, places), old_read_video(path, frames, fps, places)
            assert new.dtype == old.dtype == np.uint8 and new.shape == old.shape == (len(places), frames, 48, 64, 3)
            for clip in range(len(places)):
                for t in range(frames):  # frame by frame, for a readable failure
                    assert np.array_equal(new[clip, t], old[clip, t]), (path.name, frames, fps, places, clip, t)
            assert np.array_equal(video.read_video(path, frames, fps, places, seek=False), old)
    assert video.fallbacks == before, f'{path.name} did not seek'


@pytest.mark.parametrize('name, codec, gop', [
    ('every_frame_key.mp4', 'libx264', 1), ('gop12.mp4', 'libx264', 12), ('one_key.mp4', 'libx264', None),
    ('gop12.mkv', 'libx264', 12), ('open_gop.mp4', 'mpeg4', 12), ('open_gop.avi', 'mpeg4', 12)])
def test_seeking_gives_the_frames_of_decoding_from_the_start(tmp_path, name, codec, gop):
    assert_same_as_decoding_from_start(write_coded_video(tmp_path / name, 96, gop, codec))


@pytest.mark.parametrize('suffix', ['.mkv', '.mp4'])
def test_seeking_counts_frames_at_a_variable_frame_rate(tmp_path, suffix):
    gaps = np.random.default_rng(0).choice([10, 33, 41, 90], 96)  # ms between frames
    path = write_coded_video(tmp_path / f'vfr{suffix}', 96, 12, times_ms=np.cumsum(gaps))
    with av.open(str(path)) as container:
        times = sorted(packet.pts for packet in container.demux(video=0) if packet.size)
    if len(set(np.diff(times))) < 3:
        pytest.skip(f'{suffix} did not keep the irregular timestamps')
    assert_same_as_decoding_from_start(path)


def test_seeking_decodes_from_the_keyframe_before_the_clip(tmp_path, monkeypatch):
    path = write_coded_video(tmp_path / 'long.mp4', 240, 12)
    decoded, frames_from = [], video.frames_from

    def counting(*args):
        for frame in frames_from(*args):
            decoded.append(frame.pts)
            yield frame
    monkeypatch.setattr(video, 'frames_from', counting)
    video.read_video(path, 8, 6, [1.0])  # 29 frames (every 4th of them) at the end of 240
    assert 29 <= len(decoded) <= 29 + 11


def test_unseekable_files_are_decoded_from_the_start_silently(tmp_path, monkeypatch):
    raw = write_coded_video(tmp_path / 'raw.h264', 96, 12, fmt='h264')  # no timestamps to seek by
    before = video.fallbacks
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert np.array_equal(video.read_video(raw, 8, 6, [0.5, 1.0]), old_read_video(raw, 8, 6, [0.5, 1.0]))
    assert video.fallbacks == before + 1
    path = write_coded_video(tmp_path / 'a.mp4', 96, 12)

    def refuse(*args):
        raise av.FFmpegError(1, 'Operation not permitted')  # as from a container that cannot seek
    monkeypatch.setattr(video, 'frames_from', refuse)
    assert np.array_equal(video.read_video(path, 8, 6, [1.0]), old_read_video(path, 8, 6, [1.0]))
    assert video.fallbacks == before + 2


# ---------------------------------------------------------------- images, mixes and specs

def test_image_folder_gives_frame_invariant_labeled_clips(tmp_path):
    root = write_image_folder(tmp_path / 'imgs')
    for train in (True, False):
        dataset = data.make_dataset(str(root), frames=4, resolution=16, fps=4, train=train, seed=0)
        assert len(dataset) == 4 and dataset.num_classes == 2
        for i in range(4):
            clip, label = dataset[i]
            assert clip.shape == (3, 4, 16, 16)
            assert all(torch.equal(clip[:, 0], clip[:, t]) for t in range(1, 4))
            is_red = clip[0].mean() > clip[2].mean()
            assert label == (0 if is_red else 1)  # cat (sorted first) is red
    clip = data.load_image_clip(root / 'dog' / '1.png', 4, 16)
    assert clip.shape == (3, 4, 16, 16) and clip[2].mean() > clip[0].mean()


def test_mix_follows_the_weights(tmp_path):
    write_video(tmp_path / 'a.mp4', 6)
    listing = write_list(tmp_path / 'a.txt', ['a.mp4 7'])
    root = write_image_folder(tmp_path / 'imgs')
    dataset = data.make_dataset(f'{listing}:0.7,{root}/:0.3', frames=2, resolution=16, fps=12, train=True, seed=0)
    assert dataset.num_classes == 8
    labels = [dataset[i][1] for i in range(300)]
    assert 0.62 < labels.count(7) / 300 < 0.78
    assert torch.equal(dataset[11][0], dataset[11][0])
    single = data.make_dataset('synthetic:0.5', frames=2, resolution=16, fps=4, train=True, seed=0)
    assert isinstance(single, data.SyntheticClips)


def test_wrong_specs_explain_the_forms(tmp_path):
    (tmp_path / 'notes.json').write_text('x')
    (tmp_path / 'empty').mkdir()
    for spec in (str(tmp_path / 'nowhere'), str(tmp_path / 'notes.json'), 'synthetic:abc', 'synthetic:0', ''):
        with pytest.raises(ValueError, match=re.escape('k400.txt:0.7,imagenet/train:0.3')):
            data.make_dataset(spec, frames=4, resolution=16, fps=4, train=True, seed=0)
    with pytest.raises(ValueError, match='neither videos'):
        data.make_dataset(str(tmp_path / 'empty'), frames=4, resolution=16, fps=4, train=True, seed=0)


# ---------------------------------------------------------------- lists, decoding size, short videos

def test_csv_and_bare_path_lists(tmp_path, monkeypatch):
    write_video(tmp_path / 'a.mp4', 6)
    write_video(tmp_path / 'b.mp4', 6)
    labelled = write_list(tmp_path / 'k400.csv', ['a.mp4 3', 'b.mp4 1'])  # V-JEPA 2's lists: "path label"
    bare = write_list(tmp_path / 'clips.txt', ['a.mp4', str(tmp_path / 'b.mp4')])
    assert [label for _, label in data.list_files(str(labelled))] == [3, 1]
    assert [(path.name, label) for path, label in data.list_files(str(bare))] == [('a.mp4', -1), ('b.mp4', -1)]
    for lines, wrong in ((['a.mp4 0', 'b.mp4'], 2), (['a.mp4', 'b.mp4 1'], 2), (['a.mp4 0', '', 'b.mp4 x y'], 3)):
        mixed = write_list(tmp_path / f'mixed{wrong}{len(lines)}.csv', lines)
        with pytest.raises(ValueError, match=rf'mixed{wrong}{len(lines)}\.csv, line {wrong}'):
            data.list_files(str(mixed))
    reads, real = [], data.read_list
    monkeypatch.setattr(data, 'read_list', lambda path: reads.append(path) or real(path))
    data.read_source.cache_clear()
    for _ in range(3):  # train.py builds its datasets several times: the list is read and checked once
        data.make_dataset(str(labelled), frames=4, resolution=16, fps=12, train=True, seed=0)
    assert len(reads) == 1
    write_list(labelled, ['b.mp4 0'])  # unless it changed
    assert len(data.make_dataset(str(labelled), frames=4, resolution=16, fps=12, train=True, seed=0)) == 1


def test_decoding_at_the_crop_size_keeps_the_content(tmp_path):
    path = tmp_path / 'big.mp4'
    with av.open(str(path), 'w') as container:  # 320 x 240 with detail: stripes, a ramp and a moving square
        stream = container.add_stream('mpeg4', rate=12)
        stream.width, stream.height, stream.pix_fmt, stream.bit_rate = 320, 240, 'yuv420p', 4_000_000
        v, u = np.mgrid[0:240, 0:320]
        for t in range(8):
            image = np.stack([u * 255 // 319, 128 + 100 * np.sin(u / 16.0 + v / 24.0), np.full_like(u, 60)], -1)
            image[40 + 5 * t:100 + 5 * t, 60 + 8 * t:120 + 8 * t] = (250, 250, 20)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image.astype(np.uint8), format='rgb24')):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    full = video.read_video(path, 4, 12, [0.0])[0]
    small = video.read_video(path, 4, 12, [0.0], short_side=60)[0]
    assert full.shape == (4, 240, 320, 3) and small.shape == (4, 60, 80, 3)
    assert video.read_video(path, 4, 12, [0.0], short_side=480)[0].shape == full.shape  # never enlarged
    as_clip = lambda pixels: data.centre_views(rearrange(torch.from_numpy(pixels), 'f h w c -> c f h w'), 32, 1)[0]
    error = (as_clip(full) - as_clip(small)).abs()  # both brought to 32 px, in [-1, 1] (2 = 255 levels)
    # within resize tolerance: 1.5 levels on average, the worst pixels at the sharp edges of the square
    assert error.mean() < 0.015 and error.quantile(0.99) < 0.1


def test_short_videos_are_counted_or_skipped(tmp_path):
    write_video(tmp_path / 'short.mp4', 5)
    write_video(tmp_path / 'long.mp4', 24)
    listing = write_list(tmp_path / 'list.txt', ['short.mp4 0', 'long.mp4 1'])
    common = dict(frames=8, resolution=16, fps=12, train=True, seed=0)
    padded = data.make_dataset(str(listing), **common)
    labels = [padded[i][1] for i in range(6)]
    assert data.read_counts(padded) == (6, labels.count(0)) and 0 < labels.count(0) < 6  # short.mp4: 5 frames < 8
    skipping = data.make_dataset(str(listing), skip_short=True, **common)
    with pytest.warns(UserWarning, match='shorter than a clip'):
        assert [skipping[i][1] for i in range(6)] == [1] * 6
    assert data.read_counts(skipping) == (6, 0)
    mixed = data.make_dataset(f'{listing}:1,{listing}:2', **common)
    labels = [mixed[i][1] for i in range(6)]
    assert data.read_counts(mixed) == (6, labels.count(0))  # summed over the sources
