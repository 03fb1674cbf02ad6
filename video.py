"""
Reading video and image files: the exact frames a clip needs, decoded with PyAV, seeking to the
keyframe before each clip where the file allows it; pictures with PIL.

    python -c "from video import read_video; print(read_video('clip.mp4', 16, 4.0, [0, 0.5, 1]).shape)"

Frame k of a video is the k-th frame decoded from the start, whatever the timestamps say; seeking
changes the cost, never the frames (tests/test_data.py checks it frame by frame against decoding
from the start, on several keyframe intervals, open GOPs and variable frame rates).
"""
import itertools
from pathlib import Path

import av
import numpy as np
from einops import rearrange
from PIL import Image


class UnreadableFile(ValueError):
    """A video or image file that exists but cannot be decoded."""


class ShortVideo(UnreadableFile):
    """A video shorter than the clip asked of it, read with skip_short."""


def read_video(path, frames, fps, places, seek=True, short_side=None, skip_short=False):
    """Decode len(places) clips of `frames` frames at `fps` from one video: uint8 (clips, F, h, w, 3).
    Each place in [0, 1] puts its clip in the video (0: at the start, 0.5: centred, 1: at the end).
    Frame k is the k-th frame decoded from the start, whatever the timestamps say.

    A video shorter than the clip's span ((frames - 1) * source fps / fps + 1 frames: 64 frames at 4 fps
    span 15.75 s) gives every clip from its start, and the frames past its end repeat its final one (as
    V-JEPA 2 does unless it filters short videos); with skip_short it raises ShortVideo instead.
    short_clips counts, per process, the clips that repeated a frame.
    short_side: frames are scaled by FFmpeg while decoding so that their short side is at most this
    (never enlarged), which is cheaper than decoding at full size and resizing afterwards.
    seek: start at the keyframe before each clip (seek_frames) where possible."""
    global fallbacks, short_clips
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no such video: {path}')
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UnreadableFile(f'{path} has no video stream')
            stream = container.streams.video[0]
            source_fps = float(stream.average_rate or 30)
            step = max(source_fps / fps, 1.0)  # source frames between two sampled frames
            span = round((frames - 1) * step) + 1  # source frames one clip covers
            length = stream.frames or max(1, round((container.duration or 0) / av.time_base * source_fps))
            if skip_short and length < span:
                raise ShortVideo(f'{path} has {length} frames, fewer than the {span} a clip of {frames} at {fps} fps spans')
            size = scaled_size(stream.codec_context.width, stream.codec_context.height, short_side)
            starts = np.round(np.asarray(places) * max(length - span, 0))
            wanted = (starts[:, None] + np.round(np.arange(frames) * step)).astype(int)  # (clips, F)
            needed, decoded = set(wanted.flat), None  # frame number -> (h, w, 3)
            try:
                decoded = seek and seek_frames(container, stream, needed, size)
            except (Unseekable, av.FFmpegError):
                fallbacks += 1
        if not decoded:  # decode from the start, up to the last needed frame
            with av.open(str(path)) as container:
                last, frame, decoded = wanted.max(), None, {}
                for index, frame in enumerate(container.decode(video=0)):
                    if index in needed:
                        decoded[index] = to_rgb(frame, size)
                    if index == last:
                        break
                else:  # the video ended before the last needed frame: those repeat its final frame
                    if frame is None:
                        raise UnreadableFile(f'{path} has no frames')
                    decoded[index] = to_rgb(frame, size)
    except av.FFmpegError as error:
        raise UnreadableFile(f'cannot decode {path}: {error}') from error
    final = max(decoded)
    short_clips += int(wanted.max() > final)
    pictures = np.stack([decoded[min(index, final)] for index in wanted.flat])
    return rearrange(pictures, '(s f) h w c -> s f h w c', s=len(places))


# Seeking. FFmpeg's frame threads do not pay on one core per worker: pinned to one core, a clip of
# 16 frames at 4 fps from 60 s of 320x240 H.264 took 129 ms (median) with one thread, 125 with PyAV's
# default (slice threads, idle on such video), 149 with thread_type 'AUTO' and 2 threads, 146 with
# 'FRAME'; unpinned on 2 busy cores 'AUTO' was slower too (208 vs 187). So the default stays.
fallbacks = 0  # read_video calls in this process that could not seek and decoded from the start
short_clips = 0  # read_video calls in this process whose clips ran past the end of the video


def scaled_size(width, height, short_side):
    """(width, height) with the short side scaled down to short_side, or None to keep them."""
    if not short_side or not width or not height or min(width, height) <= short_side:
        return None
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb(frame, size):
    """A decoded frame as uint8 (h, w, 3), scaled by FFmpeg (area averaging) to size (width, height) if given."""
    if size is None:
        return frame.to_ndarray(format='rgb24')
    return frame.to_ndarray(format='rgb24', width=size[0], height=size[1], interpolation='AREA')


class Unseekable(Exception):
    """seek_frames cannot be sure which frame is which in this file."""


def seek_frames(container, stream, needed, size=None):
    """{k: frame k} for k in needed, as read_video numbers them, decoding from the last keyframe at or
    before each. One pass over the packets (no decoding) gives all presentation times: frame k has the
    k-th smallest, and each frame decoded after a seek must have its own. Anything else (no timestamps,
    no keyframe first, the decoder dropping a frame, the video ending early) raises Unseekable."""
    times, keys = [], {}  # presentation times of all packets; keyframe time -> where to seek
    for packet in container.demux(stream):
        if packet.size:
            if packet.pts is None or packet.is_discard:  # (the decoder drops discarded packets)
                raise Unseekable('packets without a timestamp, or discarded')
            times.append(packet.pts)
            if packet.is_keyframe:  # AVI and TS seek by decode times, MP4 and MKV by presentation times
                keys[packet.pts] = packet.pts if packet.dts is None else packet.dts
    times, offsets = np.sort(times), [keys[pts] for pts in sorted(keys)]
    keys = np.searchsorted(times, sorted(keys))  # frame numbers of the keyframes
    if not len(keys) or keys[0] != 0 or np.any(times[1:] == times[:-1]):
        raise Unseekable('no keyframe first, or repeated timestamps')
    decoded, frames, number = {}, None, None  # number: that of the next frame out of `frames`
    for k in sorted({min(k, len(times) - 1) for k in needed}):
        key = np.searchsorted(keys, k, side='right') - 1
        if frames is None or number < keys[key]:  # (else decoding on costs at most as much as seeking)
            frames, number = frames_from(container, stream, int(times[keys[key]]), offsets[key]), keys[key]
        for frame in frames:
            if frame.pts != times[number]:
                raise Unseekable('a frame out of place after seeking')
            number += 1
            if number - 1 == k:
                decoded[k] = to_rgb(frame, size)
                break
        else:
            raise Unseekable('the video ended early')
    return decoded


def frames_from(container, stream, pts, offset):
    """Frames from the keyframe at presentation time `pts` on: seek to a keyframe at or before `offset`,
    skip the packets before this one undecoded, and drop frames shown before it (an open GOP's)."""
    container.seek(offset, stream=stream, backward=True, any_frame=False)
    packets = container.demux(stream)
    start = next((packet for packet in packets if packet.pts == pts), None)
    if start is None:
        raise Unseekable(f'seeking missed the keyframe at {pts}')
    for packet in itertools.chain([start], packets):
        yield from (frame for frame in packet.decode() if frame.pts is None or frame.pts >= pts)


def read_image(path):
    """One RGB picture: uint8 (h, w, 3)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no such image: {path}')
    try:
        with Image.open(path) as image:
            return np.array(image.convert('RGB'))
    except OSError as error:
        raise UnreadableFile(f'cannot decode {path}: {error}') from error
