"""Video and image clips for NExT-Vid: every data source as one deterministic, endless stream.

A clip is a float32 tensor (3, F, H, W) with pixels in [-1, 1] (x / 127.5 - 1), H = W = resolution.
make_dataset(spec, ...) turns a --data string into a torch Dataset whose item i (any i >= 0,
also past len()) is a pure function of (seed, i): a resumed run sees exactly the same data, and
DDP ranks see different data as long as they read different indices.

train.py draws (3, F, H, W) training clips from make_dataset(args.data, train=True, ...);
probe.py asks for segments x views and gets (views, segments, 3, F, H, W) clips, and reads
`dataset.num_classes`; sample.py loads one clip with load_video_clip / load_image_clip. Files are
decoded by video.py.
"""
import functools
import itertools
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch.nn.functional import interpolate
from torch.utils.data import Dataset

import video
from synthetic import DIRECTIONS, SHAPES, draw_clip
from video import ShortVideo, UnreadableFile, read_image, read_video

VIDEO_SUFFIXES = {'.mp4', '.avi', '.mkv', '.webm', '.mov', '.m4v', '.mpg', '.mpeg', '.flv', '.wmv'}
IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff'}
CROP_SCALE, CROP_ASPECT = (0.3, 1.0), (3 / 4, 4 / 3)  # training random resized crop
# The smallest training crop's side is sqrt(0.3 * 3/4) = 0.47 of the frame's short side: decoding
# with that side at resolution / 0.47 never enlarges a crop (256 px: frames decoded at 540 px at most).
CROP_SHORT_SIDE = 1 / np.sqrt(CROP_SCALE[0] * CROP_ASPECT[0])
# Each purpose draws from its own stream, np.random.default_rng([seed, STREAM, ...]), so that no
# two purposes share random numbers (numpy pads seeds with zeros: [s, i] equals [s, i, 0]).
ITEM_STREAM, ORDER_STREAM, MIX_STREAM = 1, 2, 3
SPEC_HELP = """--data takes one of these forms:
  synthetic                           built-in moving textured shapes, nothing to download
  k400/train.csv                      a list (.csv or .txt) of "path label" lines, e.g. "videos/abc.mp4 3",
                                      or of bare paths (unlabelled); paths relative to the list's folder, or absolute
  videos/                             a folder of videos, unlabeled
  imagenet/train                      a folder of class subfolders of images
  k400.txt:0.7,imagenet/train:0.3     sources mixed by weight (source:weight, comma separated)"""


def resize(pixels, height, width):
    """uint8 (3, F, h, w) -> float32 (3, F, height, width) in [-1, 1], bilinear with antialiasing."""
    frames = rearrange(pixels, 'c f h w -> f c h w').float()
    frames = interpolate(frames, size=(height, width), mode='bilinear', antialias=True, align_corners=False)
    return (rearrange(frames, 'f c h w -> c f h w') / 127.5 - 1).clamp_(-1, 1)


def random_crop_flip(pixels, resolution, rng, flip=True):
    """Training view of uint8 (3, F, h, w): one random resized crop for all frames, mirrored half the
    time when `flip` (never where a label can depend on direction, SSv2's "left to right")."""
    _, _, h, w = pixels.shape
    area, aspect = h * w * rng.uniform(*CROP_SCALE), np.exp(rng.uniform(*np.log(CROP_ASPECT)))
    crop_h = min(h, max(1, round(np.sqrt(area / aspect))))  # clipped to the picture when it does not fit
    crop_w = min(w, max(1, round(np.sqrt(area * aspect))))
    top, left = rng.integers(h - crop_h + 1), rng.integers(w - crop_w + 1)
    clip = resize(pixels[:, :, top:top + crop_h, left:left + crop_w], resolution, resolution)
    return clip.flip(-1) if flip and rng.random() < 0.5 else clip  # (3, F, R, R)


def centre_views(pixels, resolution, views):
    """Evaluation views of uint8 (3, F, h, w): resize the short side to `resolution`, then take
    `views` squares along the long side (1: centre; 3: start, centre, end, as V-JEPA).
    Returns (views, 3, F, R, R)."""
    _, _, h, w = pixels.shape
    scale = resolution / min(h, w)
    clip = resize(pixels, max(resolution, round(h * scale)), max(resolution, round(w * scale)))
    spare_h, spare_w = clip.shape[2] - resolution, clip.shape[3] - resolution  # one of them is 0
    places = [0.5] if views == 1 else np.linspace(0, 1, views)
    corners = [(round(place * spare_h), round(place * spare_w)) for place in places]
    return torch.stack([clip[:, :, top:top + resolution, left:left + resolution] for top, left in corners])


def arrange(clips, frames, segments, views):
    """(v, s, 3, f, R, R), where images have f = 1 and copied views v = 1, -> (views, segments,
    3, frames, R, R); or (3, frames, R, R) when neither segments nor views was asked for."""
    clips = clips.expand(views or 1, segments or 1, 3, frames, *clips.shape[-2:])
    return (clips[0, 0] if segments is None and views is None else clips).contiguous()


def load_video_clip(path, frames, fps, resolution):
    """The centred evaluation clip of a video file: (3, F, R, R) in [-1, 1]."""
    pixels = read_video(path, frames, fps, [0.5], short_side=resolution)
    return centre_views(rearrange(torch.from_numpy(pixels[0]), 'f h w c -> c f h w'), resolution, 1)[0]


def load_image_clip(path, frames, resolution):
    """A still picture as a frame-invariant clip (centre crop repeated F times): (3, F, R, R)."""
    pixels = rearrange(torch.from_numpy(read_image(path)), 'h w c -> c 1 h w')
    return centre_views(pixels, resolution, 1)[0].expand(-1, frames, -1, -1).contiguous()


class SyntheticClips(Dataset):
    """The built-in clips of synthetic.py as an endless stream: item i is synthetic.draw_clip with
    the generator [seed, ITEM_STREAM, i], and `label` picks whether it returns the main object's
    direction or its shape (the pixels do not depend on it). No crop, and never a flip (it would
    change the direction); `fps` does not apply. With segments, one clip of segments * F frames is
    drawn and cut; views are copies of it."""

    def __init__(self, frames, resolution, seed, label='direction', distractors=2, camera_motion=0.0,
                 segments=None, views=None):
        if label not in ('direction', 'shape'):
            raise ValueError(f"synthetic label must be 'direction' or 'shape', not {label!r}")
        self.frames, self.resolution, self.seed, self.label = frames, resolution, seed, label
        self.distractors, self.camera_motion = distractors, camera_motion
        self.segments, self.views = segments, views
        self.num_classes = DIRECTIONS if label == 'direction' else SHAPES

    def __len__(self):
        return 10 ** 9  # endless: every i >= 0 is a different clip

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, ITEM_STREAM, i])
        video, shape, direction = draw_clip(rng, self.frames * (self.segments or 1), self.resolution,
                                            self.distractors, self.camera_motion)  # (segments * F, R, R, 3)
        clips = np.ascontiguousarray(rearrange(video, '(s f) h w c -> 1 s c f h w', f=self.frames))
        label = direction if self.label == 'direction' else shape
        return arrange(torch.from_numpy(clips), self.frames, self.segments, self.views), label


class FileClips(Dataset):
    """Clips from (path, label) files, videos or pictures (a picture becomes a frame-invariant clip).
    Item i reads file i % n of epoch i // n's permutation, seeded by (seed, epoch); an unreadable
    file is skipped with one warning and another is drawn from (seed, i, attempt)."""

    def __init__(self, items, frames, resolution, fps, train, seed, segments=None, views=None, flip=True, skip_short=False):
        self.items, self.frames, self.resolution, self.fps, self.flip = items, frames, resolution, fps, flip
        self.skip_short, self.warned_short = skip_short, False
        self.video_reads = torch.zeros(2, dtype=torch.int64).share_memory_()  # video items read, those that ran past the end
        self.train, self.seed, self.segments, self.views = train, seed, segments, views
        self.num_classes = max(label for _, label in items) + 1  # 0 when unlabeled (-1)
        self.epoch, self.order = None, None  # the permutation of the last epoch read
        self.attempts, self.failures, self.warned = 0, 0, set()  # reads in this process

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        for attempt in itertools.count():
            rng = np.random.default_rng([self.seed, ITEM_STREAM, i, attempt])
            path, label = self.items[self.pick(i) if attempt == 0 else rng.integers(len(self.items))]
            self.attempts += 1
            try:
                return arrange(self.read(path, rng), self.frames, self.segments, self.views), label
            except ShortVideo as error:  # --skip_short: not a failure; said once per process
                if not self.warned_short:
                    warnings.warn(f'skipping videos shorter than a clip, such as {path}: {error}')
                self.warned_short = True
            except UnreadableFile as error:
                self.failures += 1
                if path not in self.warned:
                    self.warned.add(path)
                    warnings.warn(f'skipping unreadable file {path}: {error}')
                if self.attempts >= 16 and self.failures > self.attempts / 2:
                    raise RuntimeError(f'{self.failures} of {self.attempts} files read in this process could '
                                       f'not be decoded (the last: {path}); most of the data is unreadable')

    def pick(self, i):
        """Index of the file for item i in its epoch's permutation."""
        epoch, position = divmod(i, len(self.items))
        if epoch != self.epoch:
            self.epoch = epoch
            self.order = np.random.default_rng([self.seed, ORDER_STREAM, epoch]).permutation(len(self.items))
        return self.order[position]

    def read(self, path, rng):
        """(views, segments, 3, f, R, R) from one file; f = 1 for a picture, segments spread evenly."""
        segments = self.segments or 1
        if path.suffix.lower() in IMAGE_SUFFIXES:
            pixels = read_image(path)[None, None]  # (1, 1, h, w, 3)
        else:  # segment k starts in the k-th of `segments` equal parts: at random, or centred
            offsets = rng.random(segments) if self.train else np.full(segments, 0.5)
            short_side = round(self.resolution * CROP_SHORT_SIDE) if self.train else self.resolution
            before = video.short_clips
            pixels = read_video(path, self.frames, self.fps, (np.arange(segments) + offsets) / segments, short_side=short_side,
                                skip_short=self.skip_short)
            self.video_reads += torch.tensor([1, video.short_clips - before])  # shared with the loader's workers
        clip = rearrange(torch.from_numpy(pixels), 's f h w c -> c (s f) h w')
        if self.train:
            views = torch.stack([random_crop_flip(clip, self.resolution, rng, self.flip) for _ in range(self.views or 1)])
        else:
            views = centre_views(clip, self.resolution, self.views or 1)
        return rearrange(views, 'v c (s f) h w -> v s c f h w', s=len(pixels))


class MixedClips(Dataset):
    """Sources mixed by weight: item i is item i of a source drawn from (seed, i), so each source
    serves a random share of the indices (and reads about that share of its files per epoch)."""

    def __init__(self, sources, weights, seed):
        self.sources, self.seed = sources, seed
        self.bounds = np.cumsum(weights) / np.sum(weights)
        self.num_classes = max(source.num_classes for source in sources)

    def __len__(self):
        return sum(len(source) for source in self.sources)

    def __getitem__(self, i):
        draw = np.random.default_rng([self.seed, MIX_STREAM, i]).random()
        source = min(int(np.searchsorted(self.bounds, draw, side='right')), len(self.sources) - 1)
        return self.sources[source][i]


class StepSampler(torch.utils.data.Sampler):
    """Dataset indices for steps [first, last) on one rank: for step s the global batch is
    samples offset + (s - first)*batch .. + batch, and rank r reads its contiguous share."""

    def __init__(self, first, last, offset, batch, rank, world):
        self.first, self.last, self.offset, self.batch, self.rank, self.world = first, last, offset, batch, rank, world

    def __iter__(self):
        share = self.batch // self.world
        for s in range(self.first, self.last):
            base = self.offset + (s - self.first) * self.batch + self.rank * share
            yield from range(base, base + share)

    def __len__(self):
        return (self.last - self.first) * (self.batch // self.world)


def read_counts(dataset):
    """(video items read, those whose clip ran past the end of the video) by a dataset's file sources so far,
    summed over the processes of its loader (counted in shared memory)."""
    sources = dataset.sources if isinstance(dataset, MixedClips) else [dataset]
    return tuple(sum(int(source.video_reads[k]) for source in sources if isinstance(source, FileClips)) for k in (0, 1))


def read_list(list_path):
    """(path, label) pairs of a .txt or .csv list: "path label" lines (V-JEPA 2's format), or bare paths
    (label -1: unlabelled); one kind per list, any other line refused with its number. Every listed
    file must exist."""
    items, labelled = [], None
    for number, line in enumerate(list_path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        fields = line.rsplit(maxsplit=1)
        has_label = len(fields) == 2 and fields[1].lstrip('-').isdigit()
        labelled = has_label if labelled is None else labelled
        if has_label != labelled:
            raise ValueError(f'{list_path}, line {number}: expected {"path label" if labelled else "a bare path"} as on '
                             f'the first line (e.g. {"videos/abc.mp4 3" if labelled else "videos/abc.mp4"}), got {line!r}')
        name, label = (fields[0], int(fields[1])) if labelled else (line, -1)
        items.append((os.path.join(list_path.parent, name), label))
    if not items:
        raise ValueError(f'{list_path} lists no files')
    missing = [path for path, _ in items if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f'{len(missing)} of {len(items)} files listed in {list_path} are missing: '
                                + ', '.join(missing[:3]) + (', ...' if len(missing) > 3 else ''))
    return [(Path(path), label) for path, label in items]


def scan_folder(folder):
    """Class subfolders of images (label = index of the sorted class name), else all videos below (-1)."""
    classes = sorted(path for path in folder.iterdir() if path.is_dir())
    images = [(path, label) for label, class_folder in enumerate(classes)
              for path in sorted(class_folder.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
    if images:
        return images
    videos = [(path, -1) for path in sorted(folder.rglob('*')) if path.suffix.lower() in VIDEO_SUFFIXES]
    if not videos:
        raise ValueError(f'{folder} holds neither videos ({", ".join(sorted(VIDEO_SUFFIXES))}) nor class '
                         f'subfolders of images ({", ".join(sorted(IMAGE_SUFFIXES))})')
    return videos


def list_files(name):
    """(path, label) pairs of a file source: a .txt or .csv list or a folder, read and checked once per
    process (train.py builds its datasets several times) unless it changed since."""
    return read_source(name, os.stat(name).st_mtime_ns if name and os.path.exists(name) else None)


@functools.lru_cache(maxsize=None)
def read_source(name, modified):
    path = Path(name)
    if name and path.is_dir():
        return scan_folder(path)
    if path.is_file() and path.suffix in ('.txt', '.csv'):
        return read_list(path)
    raise ValueError(f'{name!r} is not "synthetic", an existing .txt or .csv list or an existing folder\n{SPEC_HELP}')


def make_dataset(spec, *, frames, resolution, fps, train, seed, segments=None, views=None, label='direction',
                 distractors=2, camera_motion=0.0, flip=True, skip_short=False):
    """The Dataset for a --data spec (see SPEC_HELP). Item i is a pure function of (seed, i) and is
    (clip, label): clip (3, F, R, R), or (views, segments, 3, F, R, R) when segments or views is
    given; label an int (-1 for unlabeled videos; `label` picks the synthetic one, and
    `distractors` and `camera_motion` set the synthetic clips' extra moving objects and pan; `flip`
    False: training views are never mirrored; `skip_short`: videos shorter than a clip are skipped)."""
    sources, weights = [], []
    for part in spec.split(','):
        name, colon, weight = part.strip().rpartition(':')
        name, weight = (name, weight) if colon else (weight, '1')
        if not re.fullmatch(r'\d+\.?\d*|\.\d+', weight) or float(weight) == 0:
            raise ValueError(f'bad weight in {part!r} (want a positive number)\n{SPEC_HELP}')
        if name == 'synthetic':
            sources.append(SyntheticClips(frames, resolution, seed, label, distractors, camera_motion, segments, views))
        else:
            sources.append(FileClips(list_files(name), frames, resolution, fps, train, seed, segments, views, flip, skip_short))
        weights.append(float(weight))
    return sources[0] if len(sources) == 1 else MixedClips(sources, weights, seed)
