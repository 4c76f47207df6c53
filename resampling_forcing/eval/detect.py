"""Object detection in bouncing-shapes frames: coloured blobs, their sub-pixel centres, areas and shapes.

A pixel takes a palette colour when it is a mix of at least 50% of that colour with the background
(within ``color_tol`` of the background->colour line; so antialiased or dimmed edges keep their
colour). Pixels of one colour form 4-connected blobs; a blob counts as an object when its area is
between half the smallest and 3x the largest object the generator draws and it is solid (fills
>= 35% of its bounding box; noise specks are thin). Each object is then measured on luma (sharp even
in 4:2:0 mp4): sub-pixel centroid and area from the coverage around it. Blobs big enough get a
shape: the antialiased circle/square/triangle template of the same area at the same centroid with
the best soft IoU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..data.synthetic import SIZE_RANGE, luma, shape_coverage
from ..mp4 import to_uint8_video
from .config import EvalConfig


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
        return area_to_r(self.shape, self.area)


def area_to_r(shape: str | None, area: float) -> float:
    """Generator size ``r`` of a ``shape`` (None: circle) covering ``area`` pixels."""
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
        tmpl = shape_coverage(s, cx, cy, area_to_r(s, area), h, w, aa=4)
        iou = np.minimum(tmpl, cov).sum() / max(np.maximum(tmpl, cov).sum(), 1e-6)
        if iou > best_iou:
            best, best_iou = s, iou
    return best


def dilate(mask: np.ndarray) -> np.ndarray:
    """8-neighbour dilation by one pixel within each frame of a bool ``[F, H, W]`` mask."""
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


def _dilate2d(mask: np.ndarray, n: int = 1) -> np.ndarray:
    for _ in range(n):
        mask = dilate(mask[None])[0]
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

