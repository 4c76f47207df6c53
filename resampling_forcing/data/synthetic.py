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

The on-disk data set (held-out combinations, blackouts, ``make_dataset``): data/synthetic_dataset.py.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np

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
FORMAT_VERSION = 2  # bump when rendering changes: make_dataset then re-renders old files
# First seed of each set of held-out clips that evaluation makes in memory (diagnose, ablation_eval):
# generate_clip(seed) draws from default_rng(seed), a data set's videos from default_rng([seed, index]),
# so these clips are never a training video. Three disjoint sets, so that what tunes an
# experiment never sees what reports it: "eval" reports (the ablation's tables, diagnose's default),
# "calibration" sets the ablation's degradation strengths (its exposure-gap diagnostics), "validation"
# chooses its best arm.
HELD_OUT_SEED_BASES = {"eval": 10_000_000, "calibration": 11_000_000, "validation": 12_000_000}
HELD_OUT_SET_SIZE = 1_000_000  # seeds per set (eval_clips refuses to run into the next set)
HELD_OUT_SEED_BASE = HELD_OUT_SEED_BASES["eval"]


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
