"""Drift metrics of one bouncing-shapes video against its caption (the generator is known, so every
frame is measured), per segment; objects come from :func:`.detect.detect`.

Metrics (each in [0, 1] unless a unit is given; higher is better)
- ``object_fidelity``: per frame, matched / max(#expected, #found) where an expected (colour, shape)
  is matched by a blob of its colour (counts 1 if the shape agrees or is too small to tell, 0.5 if
  not); extra blobs lower it. ``count_acc``: #found == #expected. ``color_acc``: the found colours
  equal the caption's. ``shape_acc``: shape correct among matched, classifiable blobs.
- ``identity_consistency``: per frame transition and object, the object is found in both frames,
  keeps its shape class, and moved at most ``max_jump_frac`` (0.15 x frame size: the generator moves at
  most 0.05 x size per frame), i.e. it was not replaced or teleported.
- ``motion_score``: per transition and object, the object MOVES (at least half the generator's
  minimum speed) AND its new position agrees (within ``physics_tol_frac``) with the generator's physics
  predicted from the two previous positions: constant velocity, reflection at walls (near a wall
  either velocity sign is accepted, as the bounce may fall between frames), the velocity mirrored
  about the contact normal in object-object contacts. A frozen clip fails "moves"; shuffled frames fail the physics.
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
"""
from __future__ import annotations

import math

import numpy as np

from ..data.synthetic import SPEED_RANGE, bounding_radius, parse_caption
from ..mp4 import to_uint8_video
from .config import SCORE_KEYS, EvalConfig, EvalInputError, check_segment_frames
from .detect import Blob, area_to_r, detect, dilate

# bumped when a metric's definition changes, so cached evaluations (ablation_eval.cache_key) are redone;
# 2: an object-object contact must mirror the velocity about the contact normal
METRICS_VERSION = 2


def mean_or_none(values) -> float | None:
    """Mean of the defined values (not None, not NaN); None when there is none."""
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

    Constant velocity with reflections at the walls (the walls for this object's size), or, in contact
    with another object (centres within the sum of their bounding radii plus `reach`), the generator's
    collision: the velocity mirrored about the contact normal (within `tol`). A looser rule (any turn at
    constant speed near any object, both taken as squares) passed random walks at 0.79-0.87 with two or
    three objects.
    """
    r = area_to_r(shape, b1.area)
    ax = _axis_accel((b0.cx, b1.cx, b2.cx), r, w - 1 - r, reach)
    ay = _axis_accel((b0.cy, b1.cy, b2.cy), r, h - 1 - r, reach)
    if math.hypot(ax, ay) <= tol:
        return True
    v1 = (b1.cx - b0.cx, b1.cy - b0.cy)
    v2 = (b2.cx - b1.cx, b2.cy - b1.cy)
    for o in others:
        if o is None:
            continue
        dx, dy = o.cx - b1.cx, o.cy - b1.cy
        dist = math.hypot(dx, dy)
        contact = bounding_radius(shape, r) + bounding_radius(o.shape or "circle", o.radius) + reach
        if dist < 1e-6 or dist > contact:
            continue
        nx, ny = dx / dist, dy / dist
        dot = v1[0] * nx + v1[1] * ny
        mirrored = (v1[0] - 2 * dot * nx, v1[1] - 2 * dot * ny)
        if math.hypot(v2[0] - mirrored[0], v2[1] - mirrored[1]) <= tol:
            return True
    return False


def _measure(frames_u8: np.ndarray, expected: list[tuple[str, str]], cfg: EvalConfig) -> dict:
    """Per-frame and per-transition arrays (NaN where undefined)."""
    f, h, w, _ = frames_u8.shape
    m = min(h, w)
    blobs, obj_mask, bg_dist = detect(frames_u8, cfg)
    per_frame = [_frame_measures(b, expected) for b in blobs]
    outside = ~dilate(obj_mask)
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


def reference_meta_problem(meta) -> str | None:
    """Why `meta` is not generator metadata (data.synthetic.render: "frames", a list of per-frame lists of
    objects with a "center" [x, y]), or None. A sample.py sidecar has "frames": an int (a count)."""
    fr = meta.get("frames") if isinstance(meta, dict) else None
    if not isinstance(fr, list):
        return f"'frames' is {type(fr).__name__ if fr is not None else 'missing'}, not a list of per-frame objects"
    for t, objs in enumerate(fr):
        if not isinstance(objs, list) or not all(
                isinstance(o, dict) and isinstance(o.get("center"), (list, tuple)) and len(o["center"]) == 2
                and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in o["center"]) for o in objs):
            return f"frame {t} is not a list of objects with a 'center' [x, y]"
    return None


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


def _centre_errors(tracks: dict[str, list[Blob | None]], ref_centres: dict[str, np.ndarray], colors: list[str], f: int):
    """Per frame ``[F]``: mean distance (px) of the found objects to their true centres, and the
    fraction of objects with a known centre that were not found (NaN where undefined)."""
    cerr = np.full(f, np.nan)
    cmiss = np.full(f, np.nan)
    for t in range(f):
        errs, miss = [], []
        for c in colors:
            truth = ref_centres[c][t] if t < len(ref_centres[c]) else np.array([np.nan, np.nan])
            if np.isnan(truth).any():
                continue
            b = tracks[c][t]
            if b is None:
                miss.append(1.0)
            else:
                miss.append(0.0)
                errs.append(math.hypot(b.cx - truth[0], b.cy - truth[1]))
        if miss:
            cmiss[t] = np.mean(miss)
        if errs:
            cerr[t] = np.mean(errs)
    return cerr, cmiss


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
    check_segment_frames(segment_frames)
    expected = parse_caption(caption)
    if not expected:
        raise EvalInputError(f"caption names no known colour+shape pair: {caption!r}")
    video = to_uint8_video(frames)
    f = video.shape[0]
    if f == 0:
        raise EvalInputError(f"{name or 'video'}: no frames")
    seg = f if segment_frames is None else int(segment_frames)
    meas = _measure(video, expected, cfg)
    colors = [c for c, _ in expected]
    ref = to_uint8_video(reference) if reference is not None else None
    if ref is not None and ref.shape[1:] != video.shape[1:]:
        raise EvalInputError(f"{name or 'video'}: reference frames are {ref.shape[1:3]}, video frames {video.shape[1:3]}")
    if reference_meta is not None and (not isinstance(reference_meta, dict) or reference_meta.get("frames")):
        problem = reference_meta_problem(reference_meta)
        if problem:
            raise EvalInputError(f"{name or 'video'}: reference_meta is not generator metadata (no per-frame objects: "
                                 f"{problem})")
    ref_centres = _reference_centres(reference_meta, ref, colors, cfg) if (ref is not None or reference_meta) else None
    sq_err = None
    if ref is not None:
        n = min(f, ref.shape[0])
        sq_err = np.full(f, np.nan)
        diff = video[:n].astype(np.float32) / 255.0 - ref[:n].astype(np.float32) / 255.0
        sq_err[:n] = (diff**2).reshape(n, -1).mean(1)
    cerr, cmiss = _centre_errors(meas["tracks"], ref_centres, colors, f) if ref_centres is not None else (None, None)

    def summarize(a: int, b: int) -> dict:
        sl = slice(a, b)
        hits = [x for hs in meas["shape_hits"][sl] for x in hs]
        d = {"start": a, "stop": b}
        for key in ("object_fidelity", "count_acc", "color_acc"):
            d[key] = mean_or_none(meas[key][sl])
        d["shape_acc"] = float(np.mean(hits)) if hits else None
        for key in ("identity_consistency", "motion_score", "physics_consistency", "moving_fraction", "mean_speed", "mean_accel"):
            d[key] = mean_or_none(meas[key][sl])
        d["background_clean"] = mean_or_none(meas["background_clean"][sl])
        d["quality"] = mean_or_none([d[k] for k in SCORE_KEYS])
        if sq_err is not None:
            mse = mean_or_none(sq_err[sl])
            d["mse"] = mse
            d["psnr"] = None if mse is None else float(min(99.0, 10 * math.log10(1.0 / max(mse, 1e-12))))
        if cerr is not None:
            d["center_error"] = mean_or_none(cerr[sl])
            d["center_missing"] = mean_or_none(cmiss[sl])
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
            d[key] = mean_or_none([s.get(key) for s in segs])
            if isinstance(d[key], float):
                d[key] = round(d[key], 6)
        out.append(d)
    return out

