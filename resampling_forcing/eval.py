"""Drift evaluation for bouncing-shapes videos: the generator is known, so every frame is measured.

For each video (uint8 ``[F,H,W,3]`` or float in [-1,1], see :func:`resampling_forcing.io.to_uint8_video`)
and its caption (parsed with :func:`~resampling_forcing.data.synthetic.parse_caption`):

Detection (per frame). A pixel takes a palette colour when it is a mix of at least 50% of that
colour with the background (within ``color_tol`` of the background->colour line; so antialiased
or dimmed edges keep their colour). Pixels of one colour form 4-connected blobs; a blob counts as
an object when its area is between half the smallest and 3x the largest object the generator
draws and it is solid (fills >= 35% of its bounding box; noise specks are thin). Each object is
then measured on luma (sharp even in 4:2:0 mp4): sub-pixel centroid and area from the coverage
around it. Blobs big enough get a shape: the antialiased circle/square/triangle template of the
same area at the same centroid with the best soft IoU.

Metrics (each in [0, 1] unless a unit is given; higher is better)
- ``object_fidelity``: per frame, matched / max(#expected, #found) where an expected (colour, shape)
  is matched by a blob of its colour (counts 1 if the shape agrees or is too small to tell, 0.5 if
  not); extra blobs lower it. ``count_acc``: #found == #expected. ``color_acc``: the found colours
  equal the caption's. ``shape_acc``: shape correct among matched, classifiable blobs.
- ``identity_consistency``: per frame transition and object, the object is found in both frames,
  keeps its shape class, and moved at most ``max_jump`` (0.15 x frame size: the generator moves at
  most 0.05 x size per frame), i.e. it was not replaced or teleported.
- ``motion_score``: per transition and object, the object MOVES (at least half the generator's
  minimum speed) AND its new position agrees (within ``physics_tol``) with the generator's physics
  predicted from the two previous positions: constant velocity, reflection at walls (near a wall
  either velocity sign is accepted, as the bounce may fall between frames), speed kept in
  object-object contacts. A frozen clip fails "moves"; shuffled frames fail the physics.
  ``moving_fraction`` and ``physics_consistency`` are its two parts; ``mean_speed`` (px/frame) and
  ``mean_accel`` (|c[t+1] - 2c[t] + c[t-1]|, px/frame^2) are reported raw.
- ``background_clean``: fraction of pixels outside the (1-pixel dilated) objects that lie within
  ``bg_tol`` of the background colour.
- ``quality``: mean of object_fidelity, identity_consistency, motion_score, background_clean.
- With a ground-truth continuation (frames, optionally its generator metadata): ``mse`` (pixels in
  [0,1]), ``psnr`` (dB, capped at 99), ``center_error`` (px, centroid of the found object vs the
  true centre, mean over frames where it is found) and ``center_missing`` (fraction not found).

Everything is reported per segment of ``segment_frames`` frames (the training clip length), so drift
over a long rollout shows as a trend over segments; transition metrics belong to the segment of
their last frame.

CLI::

    python -m resampling_forcing.eval --videos OUT_DIR_OR_MP4S... [--captions sidecar|MAP.json]
        [--caption TEXT] [--reference DIR_OR_MP4S...] --segment-frames N --out metrics.json --plot drift.png

Captions come by default from the JSON sidecar next to each mp4 (``X.json`` next to ``X.mp4``,
key ``prompt`` or ``caption``), or from a JSON file mapping video file name / stem / path to the
caption, or one ``--caption`` for all. A sidecar may also name a ground-truth continuation under
``reference`` (path relative to the sidecar). Bad input prints one line and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .data.synthetic import (
    BACKGROUND,
    PALETTE,
    SHAPES,
    SIZE_RANGE,
    SPEED_RANGE,
    bounding_radius,
    luma,
    parse_caption,
    shape_coverage,
)
from .io import atomic_write_json, read_mp4, save_figure, to_uint8_video

SCORE_KEYS = ("object_fidelity", "identity_consistency", "motion_score", "background_clean")


@dataclass
class EvalConfig:
    palette: dict = field(default_factory=lambda: dict(PALETTE))
    background: tuple = BACKGROUND
    shapes: tuple = SHAPES
    color_tol: float = 50.0  # RGB distance of a pixel to the background->colour mixing line
    bg_tol: float = 40.0  # RGB distance for a pixel to count as clean background
    min_area_frac: float = 0.5  # of the smallest object the generator draws
    min_fill: float = 0.35  # blob area / bounding-box area
    max_area_factor: float = 3.0  # blobs bigger than this x the largest object are clutter, not objects
    shape_min_area: int = 20  # classify shapes of blobs at least this big (pixels)
    max_jump_frac: float = 0.15  # identity: max move per frame, fraction of min(H, W)
    physics_tol_frac: float = 0.035  # physics: max prediction error, fraction of min(H, W) (>= 1 px)
    min_speed_frac: float = 0.5 * SPEED_RANGE[0]  # "moves": fraction of min(H, W) per frame


class EvalInputError(ValueError):
    """Bad input for the evaluation (reported as one line by the CLI)."""


# ----------------------------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------------------------
def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels within each frame of a bool ``[F, H, W]`` mask (-1 = off)."""
    f, h, w = mask.shape
    big = np.iinfo(np.int64).max
    lab = np.where(mask, np.arange(f * h * w, dtype=np.int64).reshape(f, h, w), big)
    if not mask.any():
        return np.full(mask.shape, -1, dtype=np.int64)
    for _ in range(h * w):
        new = lab.copy()
        np.minimum(new[:, 1:, :], lab[:, :-1, :], out=new[:, 1:, :])
        np.minimum(new[:, :-1, :], lab[:, 1:, :], out=new[:, :-1, :])
        np.minimum(new[:, :, 1:], lab[:, :, :-1], out=new[:, :, 1:])
        np.minimum(new[:, :, :-1], lab[:, :, 1:], out=new[:, :, :-1])
        new = np.where(mask, new, big)
        # pointer jumping: follow the label to the label of that pixel (speeds up long blobs)
        flat = new.reshape(-1)
        on = flat != big
        flat[on] = np.minimum(flat[on], flat[flat[on]])
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(mask, lab, -1)


@dataclass
class Blob:
    frame: int
    color: str
    area: float
    cx: float
    cy: float
    x0: int
    y0: int
    x1: int
    y1: int
    shape: str | None = None

    @property
    def half_extent(self) -> float:
        return 0.5 * max(self.x1 - self.x0, self.y1 - self.y0)

    @property
    def radius(self) -> float:
        """Generator size ``r`` implied by the area (and the shape when known)."""
        return _area_to_r(self.shape, self.area)


def _area_to_r(shape: str | None, area: float) -> float:
    if shape == "square":
        return math.sqrt(area) / 2
    if shape == "triangle":
        return math.sqrt(area / (3 * math.sqrt(3) / 4))
    return math.sqrt(area / math.pi)


def _classify_shape(cov: np.ndarray, cx: float, cy: float, area: float, shapes: Sequence[str]) -> str:
    """Shape whose antialiased template (same area, same centroid) best matches the coverage map."""
    h, w = cov.shape
    best, best_iou = None, -1.0
    for s in shapes:
        tmpl = shape_coverage(s, cx, cy, _area_to_r(s, area), h, w, aa=4)
        iou = np.minimum(tmpl, cov).sum() / max(np.maximum(tmpl, cov).sum(), 1e-6)
        if iou > best_iou:
            best, best_iou = s, iou
    return best


def _dilate2d(mask: np.ndarray, n: int = 1) -> np.ndarray:
    for _ in range(n):
        mask = _dilate(mask[None])[0]
    return mask


def _color_labels(x: np.ndarray, cols: np.ndarray, bg: np.ndarray, tol: float, block: int = 32):
    """Per pixel: the palette colour it is a mix of (>= 50% colour on the background), or -1.

    A pixel x is modelled as ``bg + a * (colour - bg)``; it takes the colour with the smallest
    residual among those with ``a >= 0.5`` and residual < ``tol`` (antialiased or dimmed pixels of
    yellow stay yellow instead of looking orange).
    """
    f = x.shape[0]
    dc = cols - bg  # [K,3]
    dn = (dc * dc).sum(-1)  # [K]
    out = np.full(x.shape[:3], -1, dtype=np.int64)
    for a in range(0, f, block):
        diff = x[a : a + block] - bg  # [b,H,W,3]
        alpha = np.einsum("bhwc,kc->bhwk", diff, dc) / dn
        ac = np.clip(alpha, 0.0, 1.0)
        resid = np.sqrt(((diff[..., None, :] - ac[..., None] * dc) ** 2).sum(-1))  # [b,H,W,K]
        cand = (alpha >= 0.5) & (resid < tol)
        score = np.where(cand, resid, np.inf)
        best = score.argmin(-1)
        out[a : a + block] = np.where(cand.any(-1), best, -1)
    return out


def detect(frames, config: EvalConfig | None = None, shapes: Sequence[str] | None = None):
    """Objects per frame: ``(blobs_per_frame: list[list[Blob]], object_mask [F,H,W], bg_dist [F,H,W])``.

    Blobs are found by colour (:func:`_color_labels`, 4-connected, big and solid enough); each blob
    is then measured on luma (full resolution even in 4:2:0 video): coverage = luma contrast to the
    background relative to the blob's own full level, over the blob and the pixel ring around it
    (minus pixels next to another blob). That gives sub-pixel centroids and areas.
    """
    cfg = config or EvalConfig()
    video = to_uint8_video(frames)
    f, h, w, _ = video.shape
    x = video.astype(np.float32)
    names = list(cfg.palette)
    cols = np.array([cfg.palette[n] for n in names], dtype=np.float32)  # [K,3]
    bg = np.asarray(cfg.background, dtype=np.float32)
    bg_dist = np.sqrt(((x - bg) ** 2).sum(-1))  # [F,H,W]
    labels = _color_labels(x, cols, bg, cfg.color_tol)
    y = luma(x) - float(luma(bg))  # luma contrast to the background
    m = min(h, w)
    r_min = SIZE_RANGE[0] * m
    smallest = min(math.pi, 4.0, 3 * math.sqrt(3) / 4) * r_min * r_min
    min_area = max(4, int(cfg.min_area_frac * smallest))
    largest = 4.0 * (SIZE_RANGE[1] * m) ** 2  # the biggest square the generator draws
    max_area = cfg.max_area_factor * largest
    shapes = tuple(shapes or cfg.shapes)
    comps: list[list[tuple[str, np.ndarray]]] = [[] for _ in range(f)]
    for k, name in enumerate(names):
        mask = labels == k
        if not mask.any():
            continue
        lab = _components(mask)
        sel = lab >= 0
        ids, inv = np.unique(lab[sel], return_inverse=True)
        area = np.bincount(inv)
        big = (area >= min_area) & (area <= max_area)
        if not big.any():
            continue
        fr = np.broadcast_to(np.arange(f)[:, None, None], mask.shape)[sel]
        frame_of = np.zeros(len(ids), dtype=np.int64)
        frame_of[inv] = fr
        for c in np.nonzero(big)[0]:
            t = int(frame_of[c])
            comp = lab[t] == ids[c]
            rows, cols_ = np.nonzero(comp)
            bw, bh = cols_.max() - cols_.min() + 1, rows.max() - rows.min() + 1
            if area[c] / float(bw * bh) < cfg.min_fill:
                continue
            comps[t].append((name, comp))
    blobs: list[list[Blob]] = [[] for _ in range(f)]
    obj_mask = np.zeros((f, h, w), dtype=bool)
    ys, xs = np.mgrid[0:h, 0:w]
    for t in range(f):
        if not comps[t]:
            continue
        taken = np.zeros((h, w), dtype=bool)
        for _, comp in comps[t]:
            taken |= comp
        obj_mask[t] = taken
        for name, comp in comps[t]:
            near_others = _dilate2d(taken & ~comp, 1)
            region = _dilate2d(comp, 1) & (comp | ~near_others)
            level = y[t][comp]
            full = float(np.percentile(level, 90)) if level.size else 0.0
            if full > 8.0:
                cov = np.clip(y[t] / full, 0.0, 1.0) * region
                cov[comp] = np.maximum(cov[comp], 0.5)  # a pixel of the blob's colour is at least half covered
            else:  # no luma contrast (a colour as dark as the background): fall back to the colour mask
                cov = comp.astype(np.float32)
            a = float(cov.sum())
            cx, cy = float((cov * xs).sum() / a), float((cov * ys).sum() / a)
            rr, cc = np.nonzero(cov >= 0.5)
            b = Blob(t, name, a, cx, cy, int(cc.min()), int(rr.min()), int(cc.max()), int(rr.max()))
            if a >= cfg.shape_min_area:
                pad = 2
                ya, yb = max(0, b.y0 - pad), min(h, b.y1 + pad + 1)
                xa, xb = max(0, b.x0 - pad), min(w, b.x1 + pad + 1)
                b.shape = _classify_shape(cov[ya:yb, xa:xb], cx - xa, cy - ya, a, shapes)
            blobs[t].append(b)
    return blobs, obj_mask, bg_dist


# ----------------------------------------------------------------------------------------------
# per-frame / per-transition measurements
# ----------------------------------------------------------------------------------------------
def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[:, 1:, :] |= mask[:, :-1, :]
    out[:, :-1, :] |= mask[:, 1:, :]
    out[:, :, 1:] |= mask[:, :, :-1]
    out[:, :, :-1] |= mask[:, :, 1:]
    out[:, 1:, 1:] |= mask[:, :-1, :-1]
    out[:, :-1, :-1] |= mask[:, 1:, 1:]
    out[:, 1:, :-1] |= mask[:, :-1, 1:]
    out[:, :-1, 1:] |= mask[:, 1:, :-1]
    return out


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


def _frame_measures(blobs: list[Blob], expected: list[tuple[str, str]]) -> dict:
    by_color: dict[str, list[Blob]] = {}
    for b in blobs:
        by_color.setdefault(b.color, []).append(b)
    matched = 0.0
    shape_hits = []
    for c, s in expected:
        cands = by_color.get(c, [])
        if not cands:
            continue
        b = max(cands, key=lambda z: z.area)
        if b.shape is None:
            matched += 1.0
        else:
            shape_hits.append(b.shape == s)
            matched += 1.0 if b.shape == s else 0.5
    n_found = len(blobs)
    return {
        "object_fidelity": matched / max(len(expected), n_found, 1),
        "count_acc": float(n_found == len(expected)),
        "color_acc": float(sorted(b.color for b in blobs) == sorted(c for c, _ in expected)),
        "shape_hits": shape_hits,
    }


def _tracks(blobs_per_frame: list[list[Blob]], colors: list[str]) -> dict[str, list[Blob | None]]:
    out = {}
    for c in colors:
        track = []
        for blobs in blobs_per_frame:
            cands = [b for b in blobs if b.color == c]
            track.append(max(cands, key=lambda z: z.area) if cands else None)
        out[c] = track
    return out


def _axis_accel(p: tuple[float, float, float], lo: float, hi: float, reach: float) -> float:
    """Smallest |u2 - 2 u1 + u0| over unfoldings of a 1-D walk reflecting at ``lo``/``hi``.

    A point within ``reach`` of a wall may be replaced by its mirror image across that wall
    (the bounce may fall between any two frames); constant velocity means zero acceleration.
    """
    imgs = []
    for q in p:
        c = [q]
        if q - lo <= reach:
            c.append(2 * lo - q)
        if hi - q <= reach:
            c.append(2 * hi - q)
        imgs.append(c)
    return min(abs(c - 2 * b + a) for a in imgs[0] for b in imgs[1] for c in imgs[2])


def _physics_ok(
    b0: Blob, b1: Blob, b2: Blob, shape: str, others: list[Blob | None], h: int, w: int, tol: float, reach: float
) -> bool:
    """Is the walk b0 -> b1 -> b2 what the generator's physics does?

    Constant velocity with reflections at the walls (the walls for this object's size), or, next
    to another object, a change of direction at constant speed (the generator's object contacts).
    """
    r = _area_to_r(shape, b1.area)
    ax = _axis_accel((b0.cx, b1.cx, b2.cx), r, w - 1 - r, reach)
    ay = _axis_accel((b0.cy, b1.cy, b2.cy), r, h - 1 - r, reach)
    if math.hypot(ax, ay) <= tol:
        return True
    s1 = math.hypot(b1.cx - b0.cx, b1.cy - b0.cy)
    s2 = math.hypot(b2.cx - b1.cx, b2.cy - b1.cy)
    for o in others:
        if o is None:
            continue
        contact = bounding_radius("square", b1.radius) + bounding_radius("square", o.radius) + reach
        if math.hypot(o.cx - b1.cx, o.cy - b1.cy) <= contact and abs(s2 - s1) <= tol:
            return True
    return False


def _measure(frames_u8: np.ndarray, expected: list[tuple[str, str]], cfg: EvalConfig) -> dict:
    """Per-frame and per-transition arrays (NaN where undefined)."""
    f, h, w, _ = frames_u8.shape
    m = min(h, w)
    blobs, obj_mask, bg_dist = detect(frames_u8, cfg)
    per_frame = [_frame_measures(b, expected) for b in blobs]
    outside = ~_dilate(obj_mask)
    clean = (bg_dist < cfg.bg_tol) & outside
    n_out = outside.reshape(f, -1).sum(1)
    bg_clean = np.where(n_out > 0, clean.reshape(f, -1).sum(1) / np.maximum(n_out, 1), 1.0)
    colors = [c for c, _ in expected]
    tracks = _tracks(blobs, colors)
    max_jump = cfg.max_jump_frac * m
    tol = max(1.0, cfg.physics_tol_frac * m)
    min_speed = cfg.min_speed_frac * m
    reach = SPEED_RANGE[1] * m + tol  # how near a wall a bounce can show
    shape_of = dict(expected)
    ident = np.full(f, np.nan)
    moving = np.full(f, np.nan)
    phys = np.full(f, np.nan)
    motion = np.full(f, np.nan)
    speed = np.full(f, np.nan)
    accel = np.full(f, np.nan)
    for t in range(1, f):
        ids, spd = [], []
        for c in colors:
            a, b = tracks[c][t - 1], tracks[c][t]
            if a is None or b is None:
                ids.append(0.0)
                continue
            jump = math.hypot(b.cx - a.cx, b.cy - a.cy)
            spd.append(jump)
            same_shape = a.shape is None or b.shape is None or a.shape == b.shape
            ids.append(float(jump <= max_jump and same_shape))
        ident[t] = np.mean(ids) if ids else 1.0
        if spd:
            speed[t] = np.mean(spd)
    for t in range(2, f):
        mv, ph, mo, acc = [], [], [], []
        for c in colors:
            b0, b1, b2 = tracks[c][t - 2], tracks[c][t - 1], tracks[c][t]
            if b0 is None or b1 is None or b2 is None:
                mv.append(0.0)
                ph.append(0.0)
                mo.append(0.0)
                continue
            # either of the two steps (a step into a wall and back can be short)
            step = max(math.hypot(b2.cx - b1.cx, b2.cy - b1.cy), math.hypot(b1.cx - b0.cx, b1.cy - b0.cy))
            is_moving = step >= min_speed
            others = [tracks[o][t - 1] for o in colors if o != c]
            ok = _physics_ok(b0, b1, b2, shape_of[c], others, h, w, tol, reach)
            mv.append(float(is_moving))
            ph.append(float(ok))
            mo.append(float(is_moving and ok))
            acc.append(math.hypot(b2.cx - 2 * b1.cx + b0.cx, b2.cy - 2 * b1.cy + b0.cy))
        if colors:
            moving[t], phys[t], motion[t] = np.mean(mv), np.mean(ph), np.mean(mo)
        if acc:
            accel[t] = np.mean(acc)
    return {
        "blobs": blobs,
        "tracks": tracks,
        "object_fidelity": np.array([p["object_fidelity"] for p in per_frame]),
        "count_acc": np.array([p["count_acc"] for p in per_frame]),
        "color_acc": np.array([p["color_acc"] for p in per_frame]),
        "shape_hits": [p["shape_hits"] for p in per_frame],
        "background_clean": bg_clean,
        "identity_consistency": ident,
        "moving_fraction": moving,
        "physics_consistency": phys,
        "motion_score": motion,
        "mean_speed": speed,
        "mean_accel": accel,
    }


def _reference_centres(reference_meta: dict | None, ref_frames: np.ndarray | None, colors: list[str], cfg: EvalConfig):
    """True centres per colour and frame ([T, 2] arrays with NaN where unknown)."""
    if reference_meta is not None and reference_meta.get("frames"):
        fr = reference_meta["frames"]
        out = {c: np.full((len(fr), 2), np.nan) for c in colors}
        for t, objs in enumerate(fr):
            for o in objs:
                if o.get("color") in out:
                    out[o["color"]][t] = o["center"]
        return out
    if ref_frames is not None:
        blobs, _, _ = detect(ref_frames, cfg)
        tr = _tracks(blobs, colors)
        return {c: np.array([[b.cx, b.cy] if b is not None else [np.nan, np.nan] for b in tr[c]]) for c in colors}
    return None


def evaluate_video(
    frames,
    caption: str,
    segment_frames: int | None = None,
    reference=None,
    reference_meta: dict | None = None,
    config: EvalConfig | None = None,
    name: str | None = None,
) -> dict:
    """Measure one video against its caption; return ``{"segments": [...], "overall": {...}, ...}``.

    ``segment_frames``: the training clip length in frames (None: one segment). ``reference``: the
    ground-truth continuation (frames, any layout :func:`to_uint8_video` accepts) and/or
    ``reference_meta`` (its generator metadata, :func:`resampling_forcing.data.synthetic.render`).
    """
    cfg = config or EvalConfig()
    expected = parse_caption(caption)
    if not expected:
        raise EvalInputError(f"caption names no known colour+shape pair: {caption!r}")
    video = to_uint8_video(frames)
    f = video.shape[0]
    if f == 0:
        raise EvalInputError(f"{name or 'video'}: no frames")
    seg = int(segment_frames or f)
    if seg < 1:
        raise EvalInputError(f"segment_frames must be >= 1, got {segment_frames}")
    meas = _measure(video, expected, cfg)
    colors = [c for c, _ in expected]
    ref = to_uint8_video(reference) if reference is not None else None
    if ref is not None and ref.shape[1:] != video.shape[1:]:
        raise EvalInputError(f"{name or 'video'}: reference frames are {ref.shape[1:3]}, video frames {video.shape[1:3]}")
    ref_centres = _reference_centres(reference_meta, ref, colors, cfg) if (ref is not None or reference_meta) else None
    sq_err = None
    if ref is not None:
        n = min(f, ref.shape[0])
        sq_err = np.full(f, np.nan)
        diff = video[:n].astype(np.float32) / 255.0 - ref[:n].astype(np.float32) / 255.0
        sq_err[:n] = (diff**2).reshape(n, -1).mean(1)
    cerr = cmiss = None
    if ref_centres is not None:
        cerr = np.full(f, np.nan)
        cmiss = np.full(f, np.nan)
        for t in range(f):
            errs, miss = [], []
            for c in colors:
                truth = ref_centres[c][t] if t < len(ref_centres[c]) else np.array([np.nan, np.nan])
                if np.isnan(truth).any():
                    continue
                b = meas["tracks"][c][t]
                if b is None:
                    miss.append(1.0)
                else:
                    miss.append(0.0)
                    errs.append(math.hypot(b.cx - truth[0], b.cy - truth[1]))
            if miss:
                cmiss[t] = np.mean(miss)
            if errs:
                cerr[t] = np.mean(errs)

    def summarize(a: int, b: int) -> dict:
        sl = slice(a, b)
        hits = [x for hs in meas["shape_hits"][sl] for x in hs]
        d = {"start": a, "stop": b}
        for key in ("object_fidelity", "count_acc", "color_acc"):
            d[key] = _mean(meas[key][sl])
        d["shape_acc"] = float(np.mean(hits)) if hits else None
        for key in ("identity_consistency", "motion_score", "physics_consistency", "moving_fraction", "mean_speed", "mean_accel"):
            d[key] = _mean(meas[key][sl])
        d["background_clean"] = _mean(meas["background_clean"][sl])
        d["quality"] = _mean([d[k] for k in SCORE_KEYS])
        if sq_err is not None:
            mse = _mean(sq_err[sl])
            d["mse"] = mse
            d["psnr"] = None if mse is None else float(min(99.0, 10 * math.log10(1.0 / max(mse, 1e-12))))
        if cerr is not None:
            d["center_error"] = _mean(cerr[sl])
            d["center_missing"] = _mean(cmiss[sl])
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}

    segments = []
    for k, a in enumerate(range(0, f, seg)):
        s = summarize(a, min(f, a + seg))
        segments.append({"segment": k, **s})
    return {
        "video": name,
        "caption": caption,
        "expected": [list(e) for e in expected],
        "num_frames": f,
        "height": int(video.shape[1]),
        "width": int(video.shape[2]),
        "segment_frames": seg,
        "segments": segments,
        "overall": summarize(0, f),
    }


def mean_over_videos(results: list[dict]) -> list[dict]:
    """Per-segment means over videos (segments beyond a video's length are ignored for it)."""
    nseg = max((len(r["segments"]) for r in results), default=0)
    out = []
    for k in range(nseg):
        segs = [r["segments"][k] for r in results if k < len(r["segments"])]
        keys = [key for key in segs[0] if key not in ("segment", "start", "stop")]
        d = {"segment": k, "start": segs[0]["start"], "stop": max(s["stop"] for s in segs), "videos": len(segs)}
        for key in keys:
            d[key] = _mean([s.get(key) for s in segs])
            if isinstance(d[key], float):
                d[key] = round(d[key], 6)
        out.append(d)
    return out


def plot_drift(results: list[dict], path: str | os.PathLike, title: str | None = None) -> Path:
    """PNG of the per-segment means over videos: scores (left) and PSNR / speed (right)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    means = mean_over_videos(results)
    seg = results[0]["segment_frames"] if results else 1
    xs = [m["segment"] for m in means]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in SCORE_KEYS + ("quality",):
        ys = [m.get(key) if m.get(key) is not None else np.nan for m in means]
        axes[0].plot(xs, ys, marker="o", label=key, lw=2.5 if key == "quality" else 1.5)
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].set_xlabel(f"segment ({seg} frames each)")
    axes[0].set_ylabel("score (higher is better)")
    axes[0].legend(fontsize=7, loc="lower left")
    axes[0].grid(alpha=0.3)
    if any(m.get("psnr") is not None for m in means):
        axes[1].plot(xs, [m.get("psnr") if m.get("psnr") is not None else np.nan for m in means], marker="o", label="PSNR vs reference")
        axes[1].set_ylabel("PSNR (dB)")
        if any(m.get("center_error") is not None for m in means):
            ax2 = axes[1].twinx()
            ax2.plot(xs, [m.get("center_error") if m.get("center_error") is not None else np.nan for m in means], marker="s", color="C3", label="centre error")
            ax2.set_ylabel("centre error (px)", color="C3")
    else:
        axes[1].plot(xs, [m.get("mean_speed") if m.get("mean_speed") is not None else np.nan for m in means], marker="o", label="mean speed (px/frame)")
        axes[1].plot(xs, [m.get("mean_accel") if m.get("mean_accel") is not None else np.nan for m in means], marker="s", label="mean |accel| (px/frame^2)")
        axes[1].set_ylabel("pixels")
        axes[1].legend(fontsize=7)
    axes[1].set_xlabel(f"segment ({seg} frames each)")
    axes[1].grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title or f"drift over segments ({len(results)} video(s))")
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _collect_videos(items: Sequence[str]) -> list[Path]:
    out = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() == ".mp4" and not q.name.startswith("."))
            if not found:
                raise EvalInputError(f"{p}: folder holds no .mp4 files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise EvalInputError(f"{p}: no such file or folder")
    if not out:
        raise EvalInputError("no videos given (--videos DIR_OR_MP4 ...)")
    return out


def _load_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise EvalInputError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None


def _sidecar(video: Path) -> dict | None:
    p = video.with_suffix(".json")
    if not p.is_file():
        return None
    data = _load_json(p, "sidecar JSON")
    if not isinstance(data, dict):
        raise EvalInputError(f"{p}: sidecar must be a JSON object with a 'prompt'")
    return data


def _caption_for(video: Path, mapping: dict | None, fixed: str | None, sidecar: dict | None) -> str:
    if fixed is not None:
        return fixed
    if mapping is not None:
        for key in (video.name, video.stem, str(video)):
            if key in mapping:
                return str(mapping[key])
        raise EvalInputError(f"{video}: no caption for it in the --captions file (keys: file name, stem or path)")
    if sidecar is None:
        raise EvalInputError(f"{video}: no sidecar {video.with_suffix('.json').name} with a 'prompt'; pass --captions MAP.json or --caption TEXT")
    for key in ("prompt", "caption"):
        if isinstance(sidecar.get(key), str):
            return sidecar[key]
    raise EvalInputError(f"{video.with_suffix('.json')}: sidecar has no 'prompt' string")


def _reference_for(video: Path, refs: list[Path] | None, sidecar: dict | None) -> Path | None:
    if refs:
        for r in refs:
            cand = r / video.name if r.is_dir() else r
            if cand.is_file() and cand.name == video.name:
                return cand
        if len(refs) == 1 and refs[0].is_file():
            return refs[0]
        raise EvalInputError(f"{video}: no reference video named {video.name} in --reference")
    if sidecar is not None and isinstance(sidecar.get("reference"), str):
        p = Path(sidecar["reference"])
        p = p if p.is_absolute() else video.parent / p
        if not p.is_file():
            raise EvalInputError(f"{video.with_suffix('.json')}: reference {p} not found")
        return p
    return None


def evaluate_paths(
    videos: Sequence[str],
    captions: str = "sidecar",
    caption: str | None = None,
    references: Sequence[str] | None = None,
    segment_frames: int | None = None,
    config: EvalConfig | None = None,
) -> dict:
    """Evaluate mp4 files/folders; return ``{"segment_frames", "config", "videos", "mean", "overall"}``."""
    paths = _collect_videos(videos)
    mapping = None
    if caption is None and captions not in (None, "sidecar", "from_sidecar"):
        cp = Path(captions)
        if not cp.is_file():
            raise EvalInputError(f"{cp}: captions file not found (use 'sidecar' or a JSON map file -> caption)")
        mapping = _load_json(cp, "captions JSON")
        if not isinstance(mapping, dict):
            raise EvalInputError(f"{cp}: captions JSON must map video file name -> caption")
    refs = [Path(r) for r in references] if references else None
    if refs:
        for r in refs:
            if not r.exists():
                raise EvalInputError(f"{r}: reference not found")
    results = []
    for v in paths:
        side = None
        if (caption is None and mapping is None) or refs is None:
            try:
                side = _sidecar(v)
            except EvalInputError:
                if caption is None and mapping is None:
                    raise
        cap = _caption_for(v, mapping, caption, side)
        if not parse_caption(cap):
            raise EvalInputError(f"{v}: caption names no known colour+shape pair: {cap!r}")
        try:
            frames = read_mp4(v)
        except ValueError as e:
            raise EvalInputError(str(e)) from None
        ref_path = _reference_for(v, refs, side)
        ref_frames = ref_meta = None
        if ref_path is not None:
            try:
                ref_frames = read_mp4(ref_path)
            except ValueError as e:
                raise EvalInputError(str(e)) from None
            mp = ref_path.with_suffix(".json")
            if mp.is_file():
                meta = _load_json(mp, "reference metadata")
                ref_meta = meta if isinstance(meta, dict) and meta.get("frames") else None
        results.append(
            evaluate_video(frames, cap, segment_frames, reference=ref_frames, reference_meta=ref_meta, config=config, name=str(v))
        )
    overall = {}
    for key in results[0]["overall"]:
        if key in ("start", "stop"):
            continue
        overall[key] = _mean([r["overall"].get(key) for r in results])
    return {
        "segment_frames": results[0]["segment_frames"] if segment_frames is None else int(segment_frames),
        "config": json.loads(json.dumps(asdict(config or EvalConfig()), default=list)),
        "videos": results,
        "mean": mean_over_videos(results),
        "overall": overall,
    }


def _table(report: dict) -> str:
    keys = ["object_fidelity", "identity_consistency", "motion_score", "background_clean", "quality"]
    if any("psnr" in m for m in report["mean"]):
        keys += ["psnr", "center_error"]
    head = "segment  frames    " + "  ".join(f"{k[:12]:>12}" for k in keys)
    lines = [head]
    for m in report["mean"]:
        vals = "  ".join(f"{m[k]:12.3f}" if isinstance(m.get(k), float) else f"{'-':>12}" for k in keys)
        lines.append(f"{m['segment']:7d}  {m['start']:>4}-{m['stop']:<4} {vals}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m resampling_forcing.eval",
        description="Measure drift of generated bouncing-shapes videos against their captions, per segment.",
    )
    ap.add_argument("--videos", nargs="+", required=True, help="mp4 files and/or folders of mp4 files")
    ap.add_argument("--captions", default="sidecar", help="'sidecar' (X.json next to X.mp4 with 'prompt'; default) or a JSON file mapping video name -> caption")
    ap.add_argument("--caption", default=None, help="one caption for every video (overrides --captions)")
    ap.add_argument("--reference", nargs="+", default=None, help="ground-truth continuations: mp4 files or folders, matched by file name; X.json metadata next to them is used when present")
    ap.add_argument("--segment-frames", type=int, default=None, help="segment length in frames (the training clip length); default: whole video")
    ap.add_argument("--out", default=None, help="write the metrics JSON here (default: print the JSON to stdout)")
    ap.add_argument("--plot", default=None, help="write a PNG of the metrics over segments here")
    args = ap.parse_args(argv)
    try:
        if args.segment_frames is not None and args.segment_frames < 1:
            raise EvalInputError(f"--segment-frames must be >= 1, got {args.segment_frames}")
        report = evaluate_paths(args.videos, args.captions, args.caption, args.reference, args.segment_frames)
    except EvalInputError as e:
        print(f"eval: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        atomic_write_json(args.out, report)
    if args.plot:
        plot_drift(report["videos"], args.plot)
    if args.out:
        print(_table(report))
        print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    else:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
