"""The built-in synthetic world: textured shapes moving over a smooth, optionally panned, background.

draw_clip(rng, frames, resolution) paints one clip with numpy and names its main object's shape
and direction, the two labels of the synthetic probe. data.SyntheticClips turns it into a
deterministic stream (train.py's default data, probe.py's `synthetic` preset); nothing here
knows about torch. Pixels are float32 in [-1, 1], laid out (frames, R, R, 3).

    python -c "import numpy, synthetic; v, s, d = synthetic.draw_clip(numpy.random.default_rng(0), 16, 64); print(v.shape, synthetic.SHAPE_NAMES[s], d)"
"""
import numpy as np

SHAPE_NAMES = ('disc', 'square', 'triangle', 'cross', 'ring', 'diamond', 'bar', 'star')
SHAPES = len(SHAPE_NAMES)
DIRECTIONS = 8  # direction d moves at d * 45 degrees counter-clockwise from "right": 2 = up, 6 = down


def draw_clip(rng, frames, resolution, distractors=2, camera_motion=0.0):
    """One clip: (frames, R, R, 3) float32, its main object's shape (< SHAPES) and direction (< DIRECTIONS).

    The main object (drawn last, on top, 25-35% of the side) moves at 1.5-3 px per frame at 64 px
    (scaled with resolution), wrapping around the edges; `distractors` smaller objects move in
    random directions; `camera_motion` pans the background (px per frame at 64 px)."""
    video = background(rng, frames, resolution, camera_motion)  # (frames, R, R, 3)
    for _ in range(distractors):
        shape, angle = rng.integers(SHAPES), rng.uniform(0, 2 * np.pi)
        draw_object(video, rng, shape, angle, scale=rng.uniform(0.15, 0.25))
    shape, direction = rng.integers(SHAPES), rng.integers(DIRECTIONS)
    draw_object(video, rng, shape, direction * np.pi / 4, scale=rng.uniform(0.25, 0.35))
    return video, int(shape), int(direction)


def shape_mask(shape, size):
    """Boolean (size, size) silhouette of shape class `shape` (an index into SHAPE_NAMES)."""
    v, u = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]  # v grows downwards, u to the right
    radius, angle = np.hypot(u, v), np.arctan2(-v, u)
    big, small = np.maximum(abs(u), abs(v)), np.minimum(abs(u), abs(v))
    masks = {
        'disc': radius <= 0.9,
        'square': big <= 0.7,
        'triangle': (v <= 0.75) & (abs(u) <= (v + 0.85) * 0.55),  # apex up
        'cross': (small <= 0.28) & (big <= 0.9),
        'ring': (radius >= 0.5) & (radius <= 0.9),
        'diamond': abs(u) + abs(v) <= 0.95,
        'bar': (abs(u) <= 0.95) & (abs(v) <= 0.3),
        'star': radius <= 0.9 * (0.55 + 0.45 * np.cos(5 * (angle - np.pi / 2))),  # five points, one up
    }
    return masks[SHAPE_NAMES[shape]]


def object_texture(rng, size):
    """Stripes, checker or blocky noise in two random colours: float32 (size, size, 3)."""
    v, u = np.mgrid[0:size, 0:size]
    period = max(2, round(size * rng.uniform(0.15, 0.3)))
    kind = rng.integers(3)
    if kind == 0:  # stripes at a random angle
        tilt = rng.uniform(0, np.pi)
        pattern = np.sin(2 * np.pi * (u * np.cos(tilt) + v * np.sin(tilt)) / period) > 0
    elif kind == 1:  # checker
        pattern = (u // period + v // period) % 2 == 0
    else:  # blocky noise
        cells = rng.random((size // period + 1, size // period + 1))
        pattern = cells[v // period, u // period] > 0.5
    first, second = rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3)
    return np.where(pattern[..., None], first, second).astype(np.float32)


def draw_object(video, rng, shape, angle, scale):
    """Paint a textured shape moving at `angle` (radians, counter-clockwise from right) into video
    (frames, R, R, 3), wrapping around the edges."""
    frames, size = video.shape[:2]
    width = max(4, round(scale * size))
    mask = shape_mask(shape, width)[..., None]  # (width, width, 1)
    texture = object_texture(rng, width)  # (width, width, 3)
    speed = rng.uniform(1.5, 3.0) * size / 64  # px per frame
    start, time = rng.uniform(0, size, 2), np.arange(frames)
    top = np.round(start[0] - speed * np.sin(angle) * time).astype(int)  # image rows grow downwards
    left = np.round(start[1] + speed * np.cos(angle) * time).astype(int)
    rows = (top[:, None] + np.arange(width)) % size  # (frames, width), wrapping around
    cols = (left[:, None] + np.arange(width)) % size
    where = (time[:, None, None], rows[:, :, None], cols[:, None, :])
    video[where] = np.where(mask, texture, video[where])


def background(rng, frames, size, camera_motion):
    """Smooth periodic noise between two random colours, panned by `camera_motion` px per frame at
    64 px: (frames, size, size, 3)."""
    grid = np.arange(size) * (2 * np.pi / size)
    waves = zip(rng.integers(-4, 5, 4), rng.integers(-4, 5, 4), rng.uniform(0, 2 * np.pi, 4))
    noise = sum(np.sin(fy * grid[:, None] + fx * grid[None, :] + phase) for fy, fx, phase in waves)
    noise = (noise - noise.min()) / (noise.max() - noise.min() + 1e-6)
    dark, light = rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3)
    image = np.tile(dark + (light - dark) * noise[..., None], (2, 2, 1)).astype(np.float32)  # (2R, 2R, 3)
    pan, angle = camera_motion * size / 64 * np.arange(frames), rng.uniform(0, 2 * np.pi)
    shifts = np.round(pan[:, None] * [np.sin(angle), np.cos(angle)]).astype(int) % size  # (frames, 2)
    return np.stack([image[dy:dy + size, dx:dx + size] for dy, dx in shifts])


