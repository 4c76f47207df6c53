"""Bouncing-shapes videos: a tiny text-to-video data set whose ground truth is known exactly.

A scene is 1..``max_objects`` flat-coloured shapes (circle, square, optionally triangle) on a dark,
clean background. Each object has its own colour (colours are distinct inside a scene, so a colour
names an object), a size (half extent ``r`` in pixels), and a constant speed: it moves in a straight
line, reflects off the walls, and reflects off other objects (each object mirrors its own velocity
about the contact normal, so every object keeps its speed forever and never stops). Collisions are
resolved after each step, so two objects can overlap by a few pixels for a frame (at most ~3 px at
32x32 in 300 two-object scenes of 48 frames; the one drawn later covers the other there); otherwise
every object is fully visible, except during a clip's optional blackout: frames
``[start, start + length)`` show the background only while the objects keep moving unseen (an occlusion
of the whole scene; the frames after it test whether a model remembers what it saw before).

Everything is deterministic in the seed: ``generate_clip(seed, frames=N)`` and
``generate_clip(seed, frames=M)`` agree on their first ``min(N, M)`` frames, so a long clip is the
ground-truth continuation of a short one (clips can be far longer than the training length).

Coordinates: ``center = [x, y]`` in pixels, x = column, y = row, pixel (row i, col j) has its centre
at (x=j, y=i). Edges are antialiased (a pixel's colour mixes object and background by the
fraction of the pixel the shape covers, 4x4 supersampling). Every shape's centroid is its ``center``:
- circle: radius ``r``; square: axis aligned, half side ``r``;
- triangle: pointing up, inscribed in the circle of radius ``r`` (vertices at -90, 30, 150 degrees).

Captions: "a red circle bouncing", "a red circle and a blue square bouncing"; :func:`parse_caption`
turns one back into ``[(colour, shape), ...]``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

# Palette: names -> RGB. The first four are the defaults; the rest are opt-in extras, chosen to be
# far apart from each other and from the background in RGB.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (235, 215, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 210, 220),
    "white": (235, 235, 235),
    "orange": (245, 140, 20),
}
BACKGROUND: tuple[int, int, int] = (16, 16, 16)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DEFAULT_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square")
# Object half extent, as a fraction of min(H, W); speed in pixels/frame, as a fraction of min(H, W).
SIZE_RANGE: tuple[float, float] = (0.11, 0.17)
SPEED_RANGE: tuple[float, float] = (0.025, 0.05)
MANIFEST_NAME = "manifest.jsonl"
BLACKOUT_MARGIN = 2  # visible frames a data set's blackout leaves before and after it
FORMAT_VERSION = 2  # bump when rendering changes: make_dataset then re-renders old files
# First seed of the held-out clips that evaluation makes in memory (diagnose, ablation_eval):
# generate_clip(seed) draws from default_rng(seed), a data set's videos from default_rng([seed, index]),
# so these clips are never a training video
HELD_OUT_SEED_BASE = 10_000_000


def bounding_radius(shape: str, r: float) -> float:
    """Radius of the circle around the shape (used for object-object collisions)."""
    return r * math.sqrt(2.0) if shape == "square" else r


@dataclass
class ObjectSpec:
    color: str
    shape: str
    size: float  # half extent r in pixels
    position: tuple[float, float]  # initial centre (x, y)
    velocity: tuple[float, float]  # pixels per frame (vx, vy)


@dataclass
class SceneSpec:
    height: int
    width: int
    objects: list[ObjectSpec] = field(default_factory=list)
    background: tuple[int, int, int] = BACKGROUND

    @property
    def caption(self) -> str:
        return make_caption([(o.color, o.shape) for o in self.objects])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["objects"] = [asdict(o) for o in self.objects]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SceneSpec":
        objs = [
            ObjectSpec(o["color"], o["shape"], float(o["size"]), tuple(o["position"]), tuple(o["velocity"]))
            for o in d["objects"]
        ]
        return cls(int(d["height"]), int(d["width"]), objs, tuple(d.get("background", BACKGROUND)))


# ----------------------------------------------------------------------------------------------
# captions
# ----------------------------------------------------------------------------------------------
def make_caption(objects: Sequence[tuple[str, str]]) -> str:
    """``[("red", "circle"), ("blue", "square")]`` -> "a red circle and a blue square bouncing"."""
    if not objects:
        raise ValueError("a caption needs at least one object")
    parts = [f"a {c} {s}" for c, s in objects]
    if len(parts) == 1:
        body = parts[0]
    else:
        body = ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{body} bouncing"


_CAPTION_RE = re.compile(
    r"\b(" + "|".join(PALETTE) + r")\s+(" + "|".join(SHAPES) + r")s?\b", flags=re.IGNORECASE
)


def parse_caption(caption: str) -> list[tuple[str, str]]:
    """Return the ``(colour, shape)`` pairs a caption names, in order (unknown words are ignored).

    ``parse_caption("a red circle and a blue square bouncing") == [("red", "circle"), ("blue", "square")]``.
    Returns an empty list when the caption names no known colour+shape pair.
    """
    return [(m.group(1).lower(), m.group(2).lower()) for m in _CAPTION_RE.finditer(caption or "")]


def combo_key(objects: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Order-free key of a scene's content (used to hold combinations out of training)."""
    return tuple(sorted((c, s) for c, s in objects))


# ----------------------------------------------------------------------------------------------
# scene sampling and physics
# ----------------------------------------------------------------------------------------------
def _hw(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def sample_scene(
    rng: np.random.Generator | int,
    size: int | tuple[int, int] = 32,
    objects: Sequence[tuple[str, str]] | None = None,
    max_objects: int = 2,
    colors: Sequence[str] = DEFAULT_COLORS,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    size_range: tuple[float, float] = SIZE_RANGE,
    speed_range: tuple[float, float] = SPEED_RANGE,
) -> SceneSpec:
    """Sample sizes, positions and velocities for ``objects`` (or for a random content).

    ``objects``: the ``(colour, shape)`` list to place (e.g. from :func:`parse_caption`); when None,
    1..``max_objects`` objects with distinct colours are drawn from ``colors`` x ``shapes``.
    Objects are placed without overlap (rejection sampling; falls back to overlap only when the frame
    is too small to fit them).
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    h, w = _hw(size)
    m = min(h, w)
    if objects is None:
        n = int(rng.integers(1, max_objects + 1))
        n = min(n, len(colors))
        cols = rng.choice(len(colors), size=n, replace=False)
        objects = [(colors[int(c)], shapes[int(rng.integers(len(shapes)))]) for c in cols]
    for c, s in objects:
        if c not in PALETTE:
            raise ValueError(f"unknown colour {c!r}; known: {sorted(PALETTE)}")
        if s not in SHAPES:
            raise ValueError(f"unknown shape {s!r}; known: {SHAPES}")
    specs: list[ObjectSpec] = []
    for c, s in objects:
        r = float(rng.uniform(*size_range)) * m
        speed = float(rng.uniform(*speed_range)) * m
        ang = float(rng.uniform(0, 2 * math.pi))
        vel = (speed * math.cos(ang), speed * math.sin(ang))
        pos = None
        for _ in range(200):
            cand = (float(rng.uniform(r, w - 1 - r)), float(rng.uniform(r, h - 1 - r)))
            ok = all(
                math.hypot(cand[0] - o.position[0], cand[1] - o.position[1])
                > bounding_radius(s, r) + bounding_radius(o.shape, o.size) + 0.5
                for o in specs
            )
            if ok:
                pos = cand
                break
        if pos is None:
            pos = cand  # crowded frame: accept an overlapping start
        specs.append(ObjectSpec(c, s, r, pos, vel))
    return SceneSpec(h, w, specs)


def scene_from_caption(caption: str, seed: int = 0, size: int | tuple[int, int] = 32, **kwargs) -> SceneSpec:
    """Scene spec for a caption (random sizes/positions/velocities from ``seed``)."""
    objs = parse_caption(caption)
    if not objs:
        raise ValueError(f"caption names no known colour+shape pair: {caption!r}")
    return sample_scene(np.random.default_rng(seed), size=size, objects=objs, **kwargs)


def simulate(scene: SceneSpec, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and velocities per frame: two float64 arrays ``[F, K, 2]`` (x, y)."""
    k = len(scene.objects)
    pos = np.array([o.position for o in scene.objects], dtype=np.float64).reshape(k, 2)
    vel = np.array([o.velocity for o in scene.objects], dtype=np.float64).reshape(k, 2)
    r = np.array([o.size for o in scene.objects], dtype=np.float64)
    rb = np.array([bounding_radius(o.shape, o.size) for o in scene.objects], dtype=np.float64)
    lo = r[:, None] * np.ones((1, 2))
    hi = np.stack([scene.width - 1 - r, scene.height - 1 - r], axis=1)
    out_p = np.zeros((frames, k, 2))
    out_v = np.zeros((frames, k, 2))
    for t in range(frames):
        out_p[t], out_v[t] = pos, vel
        pos = pos + vel
        # walls: mirror the position back inside and flip that velocity component
        below, above = pos < lo, pos > hi
        pos = np.where(below, 2 * lo - pos, pos)
        pos = np.where(above, 2 * hi - pos, pos)
        vel = np.where(below | above, -vel, vel)
        pos = np.clip(pos, lo, np.maximum(lo, hi))
        # objects: each approaching object mirrors its own velocity about the contact normal
        for i in range(k):
            for j in range(i + 1, k):
                d = pos[j] - pos[i]
                dist = float(np.hypot(*d))
                if dist >= rb[i] + rb[j] or dist < 1e-9:
                    continue
                n = d / dist
                if float(np.dot(vel[j] - vel[i], n)) >= 0:
                    continue  # already separating
                if np.dot(vel[i], n) > 0:
                    vel[i] = vel[i] - 2 * np.dot(vel[i], n) * n
                if np.dot(vel[j], -n) > 0:
                    vel[j] = vel[j] - 2 * np.dot(vel[j], n) * n
    return out_p, out_v


def shape_mask(shape: str, cx, cy, r, height: int, width: int) -> np.ndarray:
    """Boolean mask(s) of a shape. ``cx, cy, r`` may be arrays ``[F]`` -> mask ``[F, H, W]``."""
    cx = np.asarray(cx, dtype=np.float64)[..., None, None]
    cy = np.asarray(cy, dtype=np.float64)[..., None, None]
    r = np.asarray(r, dtype=np.float64)[..., None, None]
    ys = np.arange(height, dtype=np.float64)[:, None]
    xs = np.arange(width, dtype=np.float64)[None, :]
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":
        s3 = math.sqrt(3.0)
        # vertices (0,-r), (r*s3/2, r/2), (-r*s3/2, r/2): three half planes
        return (dy <= r / 2) & (s3 * dx - dy <= r) & (-s3 * dx - dy <= r)
    raise ValueError(f"unknown shape {shape!r}")


def shape_coverage(shape: str, cx, cy, r, height: int, width: int, aa: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by the shape (``aa`` x ``aa`` supersampling), float32.

    ``cx, cy, r`` scalars -> ``[H, W]``; arrays ``[F]`` -> ``[F, H, W]``. ``aa=1`` gives the hard
    pixel-centre mask of :func:`shape_mask` as 0/1.
    """
    if aa <= 1:
        return shape_mask(shape, cx, cy, r, height, width).astype(np.float32)
    # sample points at sub-pixel offsets; pixel centre (i, j) sits at (x=j, y=i)
    off = (np.arange(aa) + 0.5) / aa - 0.5
    cx = np.asarray(cx, dtype=np.float64)
    cy = np.asarray(cy, dtype=np.float64)
    acc = None
    for oy in off:
        for ox in off:
            m = shape_mask(shape, cx - ox, cy - oy, r, height, width)
            acc = m.astype(np.float32) if acc is None else acc + m
    return acc / float(aa * aa)


def luma(rgb) -> np.ndarray:
    """BT.601 luma of RGB values (last axis)."""
    rgb = np.asarray(rgb, dtype=np.float32)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def check_blackout(blackout, frames: int) -> tuple[int, int] | None:
    """``(start, length)`` inside ``[0, frames)`` or None; a one-line ValueError otherwise."""
    if blackout is None:
        return None
    try:
        start, length = (int(x) for x in blackout)
    except (TypeError, ValueError):
        raise ValueError(f"blackout={blackout!r}: need (start, length) frames") from None
    if start < 0 or length < 1 or start + length > frames:
        raise ValueError(f"blackout={blackout!r}: (start, length) must lie inside the clip's {frames} frames")
    return start, length


def render(scene: SceneSpec, frames: int, aa: int = 4, blackout=None) -> tuple[np.ndarray, dict]:
    """Render ``frames`` frames: ``(uint8 [F, H, W, 3], metadata)``.

    ``blackout``: optional ``(start, length)``; those frames show the background only (the objects
    move on unseen; their metadata entries then carry ``"visible": False``).

    Edges are antialiased by ``aa`` x ``aa`` supersampling (``aa=1``: hard pixel-centre edges), so
    sub-pixel motion is visible and object centroids are exact to a small fraction of a pixel.

    ``metadata``: ``caption``, ``prompt`` (same text, the key the sampler's sidecars use), ``height``,
    ``width``, ``num_frames``, ``background``, ``objects`` (static: colour, shape, rgb, size) and
    ``frames``: per frame a list (one entry per object, in caption order) of
    ``{"color", "shape", "center": [x, y], "size", "velocity": [vx, vy]}``; ``blackout`` ([start,
    length] or None).
    """
    blackout = check_blackout(blackout, frames)
    h, w = scene.height, scene.width
    pos, vel = simulate(scene, frames)
    img = np.empty((frames, h, w, 3), dtype=np.float32)
    img[:] = np.asarray(scene.background, dtype=np.float32)
    for k, o in enumerate(scene.objects):  # later objects on top (they never overlap anyway)
        cov = shape_coverage(o.shape, pos[:, k, 0], pos[:, k, 1], np.full(frames, o.size), h, w, aa=aa)[..., None]
        img = img * (1.0 - cov) + np.asarray(PALETTE[o.color], dtype=np.float32) * cov
    dark = np.zeros(frames, dtype=bool)
    if blackout is not None:
        dark[blackout[0]:blackout[0] + blackout[1]] = True
        img[dark] = np.asarray(scene.background, dtype=np.float32)
    video = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    per_frame = [
        [
            {
                "color": o.color,
                "shape": o.shape,
                "center": [round(float(pos[t, k, 0]), 4), round(float(pos[t, k, 1]), 4)],
                "size": round(float(o.size), 4),
                "velocity": [round(float(vel[t, k, 0]), 4), round(float(vel[t, k, 1]), 4)],
                **({"visible": False} if dark[t] else {}),
            }
            for k, o in enumerate(scene.objects)
        ]
        for t in range(frames)
    ]
    meta = {
        "caption": scene.caption,
        "prompt": scene.caption,
        "height": h,
        "width": w,
        "num_frames": frames,
        "background": list(scene.background),
        "objects": [
            {"color": o.color, "shape": o.shape, "rgb": list(PALETTE[o.color]), "size": round(float(o.size), 4)}
            for o in scene.objects
        ],
        "scene": scene.to_dict(),
        "frames": per_frame,
        "blackout": None if blackout is None else list(blackout),
    }
    return video, meta


def generate_clip(
    seed: int,
    frames: int = 48,
    size: int | tuple[int, int] = 32,
    caption: str | None = None,
    aa: int = 4,
    blackout=None,
    **scene_kwargs,
) -> tuple[np.ndarray, dict]:
    """One clip: ``(uint8 [F, H, W, 3], metadata)``; deterministic in ``seed`` (and the other args).
    ``blackout``: ``(start, length)`` frames showing the background only (see :func:`render`).

    With ``caption`` the content follows the caption (random layout from ``seed``); otherwise it is
    sampled (see :func:`sample_scene` for ``max_objects``, ``colors``, ``shapes``).
    """
    if caption is not None:
        scene = scene_from_caption(caption, seed=seed, size=size, **scene_kwargs)
    else:
        scene = sample_scene(np.random.default_rng(seed), size=size, **scene_kwargs)
    video, meta = render(scene, frames, aa=aa, blackout=blackout)
    meta["seed"] = seed
    return video, meta


# ----------------------------------------------------------------------------------------------
# held-out combinations and the on-disk data set
# ----------------------------------------------------------------------------------------------
def all_combos(colors: Sequence[str], shapes: Sequence[str], max_objects: int) -> list[tuple]:
    """Every order-free scene content with 1..max_objects objects of distinct colours."""
    import itertools

    pairs = [(c, s) for c in colors for s in shapes]
    combos = []
    for n in range(1, max_objects + 1):
        for cols in itertools.combinations(sorted(colors), n):
            for shp in itertools.product(shapes, repeat=n):
                combos.append(combo_key(zip(cols, shp)))
    assert all(all(p in pairs for p in c) for c in combos)
    return combos


def held_out_combos(
    colors: Sequence[str] = DEFAULT_COLORS,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    max_objects: int = 2,
    fraction: float = 0.1,
    seed: int = 0,
) -> list[tuple]:
    """Scene contents reserved for the test split (never seen in training).

    ``round(fraction * #multi-object combos)`` (at least 1 when fraction > 0) multi-object
    combinations are held out, so every single (colour, shape) pair is still seen in training and the
    held-out captions test composition. With ``max_objects == 1``, single pairs are held out instead.
    """
    if fraction <= 0:
        return []
    combos = all_combos(colors, shapes, max_objects)
    pool = [c for c in combos if len(c) > 1] or combos
    n = max(1, int(round(fraction * len(pool))))
    n = min(n, len(pool) - 1) if len(pool) > 1 else n
    rng = np.random.default_rng([seed, 7919])
    idx = rng.permutation(len(pool))[:n]
    return sorted(pool[int(i)] for i in idx)


def _is_test_index(i: int, fraction: float) -> bool:
    # exactly ceil(n * fraction) test videos in every prefix of n videos, independent of num_videos
    return fraction > 0 and math.ceil((i + 1) * fraction) > math.ceil(i * fraction)


def _draw_blackout(i: int, seed: int, frames: int, prob: float, lengths: tuple[int, int]) -> list[int] | None:
    """Video ``i``'s blackout [start, length] or None: with probability ``prob`` a length in
    ``lengths`` (inclusive) and a start leaving at least ``BLACKOUT_MARGIN`` visible frames on both
    sides. Its own random stream, so the scenes are the same with or without blackouts."""
    if prob <= 0:
        return None
    rng = np.random.default_rng([seed, i, 2])
    if rng.random() >= prob:
        return None
    length = int(rng.integers(lengths[0], lengths[1] + 1))
    start = int(rng.integers(BLACKOUT_MARGIN, frames - length - BLACKOUT_MARGIN + 1))
    return [start, length]


def check_blackout_law(frames: int, prob: float, lengths) -> None:
    """One-line ValueError unless ``prob`` in [0, 1] and ``lengths`` = [lo, hi] fit ``frames``."""
    if not 0 <= prob <= 1:
        raise ValueError(f"blackout probability {prob!r} must be in [0, 1]")
    lo, hi = lengths
    if not 1 <= lo <= hi:
        raise ValueError(f"blackout lengths {list(lengths)}: need 1 <= lo <= hi")
    if prob > 0 and hi + 2 * BLACKOUT_MARGIN > frames:
        raise ValueError(f"blackout lengths up to {hi} frames do not fit {frames}-frame clips with "
                         f"{BLACKOUT_MARGIN} visible frames before and after; shorten them or lengthen the clips")


def _video_spec(
    i: int, seed: int, frames: int, size, fps: float, split: str, held_out: list, colors, shapes, max_objects, aa: int = 4,
    blackout: list[int] | None = None,
) -> dict:
    """The deterministic recipe of video ``i`` (cheap: no rendering). Stored in its metadata."""
    rng = np.random.default_rng([seed, i])
    held = set(held_out)
    if split == "test":
        objs = list(held_out[int(rng.integers(len(held_out)))])
        order = rng.permutation(len(objs))
        objs = [objs[int(k)] for k in order]
    else:
        for _ in range(1000):
            scene = sample_scene(rng, size=size, max_objects=max_objects, colors=colors, shapes=shapes)
            if combo_key((o.color, o.shape) for o in scene.objects) not in held:
                break
        objs = [(o.color, o.shape) for o in scene.objects]
    scene = sample_scene(rng, size=size, objects=objs)
    h, w = _hw(size)
    spec = {
        "format": FORMAT_VERSION,
        "index": i,
        "seed": seed,
        "frames": frames,
        "height": h,
        "width": w,
        "fps": float(fps),
        "split": split,
        "aa": int(aa),
        "scene": scene.to_dict(),
    }
    if blackout is not None:  # absent otherwise: data sets made before blackouts existed stay valid
        spec["blackout"] = blackout
    return spec


def make_dataset(
    out_dir: str | os.PathLike,
    num_videos: int,
    frames: int = 48,
    size: int | tuple[int, int] = 32,
    fps: float = 8,
    seed: int = 0,
    held_out_fraction: float = 0.1,
    max_objects: int = 2,
    colors: Sequence[str] = DEFAULT_COLORS,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    aa: int = 4,
    pix_fmt: str = "yuv444p",
    progress: bool = False,
    blackout_prob: float = 0.0,
    blackout_frames: Sequence[int] = (4, 6),
) -> Path:
    """Write a bouncing-shapes data set and return the path of its ``manifest.jsonl``.

    Layout under ``out_dir``: ``videos/000000.mp4`` + ``videos/000000.json`` (ground-truth metadata,
    see :func:`render`; it also carries ``prompt`` so the folder is evaluable with sidecar captions),
    ``manifest.jsonl`` (one ``{"path", "caption", "split"}`` per line, paths relative to the manifest)
    and ``dataset.json`` (the arguments, the held-out combinations and their captions).

    Split: ``ceil(n * held_out_fraction)`` of every n videos are "test" and show only held-out
    combinations (:func:`held_out_combos`); "train" videos never show them.
    Idempotent and resumable: a video whose mp4 and metadata exist and whose stored recipe equals the
    requested one is not rendered again; files are written atomically (metadata after the mp4, so the
    metadata marks completion).

    ``pix_fmt``: H.264 pixel format of the data files. Default ``yuv444p``: full-resolution colour
    (4:2:0 halves the chroma resolution, which visibly fringes 32x32 shapes; mean error 1.8 vs 0.3
    levels); decord, PyAV and imageio read it, but some browsers do not play it: pass ``"yuv420p"``
    for files meant for viewing.
    """
    from ..io import atomic_write_json, atomic_write_text, write_mp4

    if num_videos < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if not 0 <= held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    blackout_frames = tuple(int(x) for x in blackout_frames)
    check_blackout_law(frames, blackout_prob, blackout_frames)
    out = Path(out_dir)
    vdir = out / "videos"
    vdir.mkdir(parents=True, exist_ok=True)
    held_out = held_out_combos(colors, shapes, max_objects, held_out_fraction, seed)
    it = range(num_videos)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="synthetic videos")
    rows = []
    made = 0
    for i in it:
        split = "test" if (held_out and _is_test_index(i, held_out_fraction)) else "train"
        blackout = _draw_blackout(i, seed, frames, blackout_prob, blackout_frames)
        spec = _video_spec(i, seed, frames, size, fps, split, held_out, colors, shapes, max_objects, aa, blackout)
        spec["pix_fmt"] = pix_fmt
        mp4 = vdir / f"{i:06d}.mp4"
        meta_path = vdir / f"{i:06d}.json"
        scene = SceneSpec.from_dict(spec["scene"])
        done = False
        if mp4.is_file() and meta_path.is_file():
            try:
                with open(meta_path) as f:
                    done = json.load(f).get("spec") == json.loads(json.dumps(spec))
            except (OSError, ValueError):
                done = False
        if not done:
            video, meta = render(scene, frames, aa=aa, blackout=blackout)
            meta.update(seed=seed, index=i, split=split, fps=float(fps), spec=spec)
            write_mp4(mp4, video, fps=fps, pix_fmt=pix_fmt)
            atomic_write_json(meta_path, meta, indent=None)
            made += 1
        rows.append({"path": f"videos/{mp4.name}", "caption": scene.caption, "split": split})
    manifest = out / MANIFEST_NAME
    atomic_write_text(manifest, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(
        out / "dataset.json",
        {
            "format": FORMAT_VERSION,
            "num_videos": num_videos,
            "frames": frames,
            "size": list(_hw(size)),
            "fps": float(fps),
            "seed": seed,
            "held_out_fraction": held_out_fraction,
            "max_objects": max_objects,
            "colors": list(colors),
            "shapes": list(shapes),
            "aa": int(aa),
            "pix_fmt": pix_fmt,
            "blackout_prob": blackout_prob,
            "blackout_frames": list(blackout_frames),
            "held_out_combos": [list(map(list, c)) for c in held_out],
            "held_out_captions": [make_caption(c) for c in held_out],
        },
    )
    logger.info("synthetic data set %s: %d videos (%d rendered, %d reused)", out, num_videos, made, num_videos - made)
    return manifest
