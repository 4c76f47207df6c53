"""Model-free drift measures of ANY video (real or generated): how what long autoregressive rollouts are
known to do (blur, over-saturate, shift colour, flicker, freeze) shows in the pixels, segment by segment.

    python -m resampling_forcing.eval.pixel outputs/rf/ --segment-seconds 5 --out drift.json
    python -m resampling_forcing.eval.pixel outputs/rf/ --compare outputs/tf/ --segment-seconds 5 --out rf_vs_tf.json

Per frame (RGB in 0..255; luma Y = 0.299 R + 0.587 G + 0.114 B):
    sharpness     variance of the 4-neighbour Laplacian of Y (blur lowers it)
    saturation    mean HSV saturation (max - min) / max, in [0, 1], over pixels with max > 0 (over-saturation
                  raises it)
    brightness    mean Y;  contrast: standard deviation of Y
    colorfulness  Hasler & Suesstrunk's M: sigma_rgyb + 0.3 mu_rgyb of rg = R - G, yb = (R + G) / 2 - B
    motion        mean |Y_t - Y_{t-1}| (0 for a frozen video; none for the first frame)
    flicker       |mean Y_t - mean Y_{t-1}| (global brightness jumps)
Per segment: the means of those, and `color_drift`: the Hellinger distance of the segment's RGB histogram
(8 bins per channel) to the first segment's, in [0, 1] (0 = the same colours). A last piece shorter than
half a segment joins the segment before it. `drift` compares the last segment with the first (a ratio for
sharpness, saturation, colorfulness, contrast, motion; a difference for the rest; none for one segment).
Videos are read block by block (mp4.iter_mp4): memory does not grow with their length.

These are proxies with no model and no reference: they say that and how a video changes over time, not
whether it is good (a scene may rightly get darker). For prompt adherence and per-segment quality use a
learned metric (VBench); on the synthetic world, the object metrics of `python -m resampling_forcing.eval`.
With --compare, each video is paired with the one of the same file name in the other set and the
per-segment differences get a 95% interval over the pairs (stats.interval) and a paired t test's p
(segment k of each: pair videos of one length, or the joined last segments span different frames).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from ..cli import BadInput, OneLineParser, add_overwrite, check_output_file, doc_summary, run_cli
from ..io import atomic_write_text
from ..mp4 import VideoReadError, iter_mp4, to_uint8_video
from ..stats import interval, mean_test

__all__ = ["FRAME_MEASURES", "SEGMENT_MEASURES", "frame_measures", "color_histogram", "hellinger", "measure_video",
           "measure_blocks", "summary", "compare", "main"]

FRAME_MEASURES = ("sharpness", "saturation", "brightness", "contrast", "colorfulness", "motion", "flicker")
SEGMENT_MEASURES = FRAME_MEASURES + ("color_drift",)
RATIO_MEASURES = ("sharpness", "saturation", "colorfulness", "contrast", "motion")  # drift: last / first
HIST_BINS = 8  # per channel: bin = value >> 5
BLOCK = 8  # frames measured at once (a 720p block: ~0.4 GiB of float32 work)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _block_measures(block: np.ndarray, prev_y: Optional[np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Measures of the uint8 frames `block` [n, H, W, 3] after the frame whose luma is `prev_y` (None: the
    video's first) -> ({measure: [n]}, the last frame's luma)."""
    rgb = block.astype(np.float32)
    y = _luma(rgb)
    n = y.shape[0]
    out = {}
    if y.shape[1] >= 3 and y.shape[2] >= 3:
        lap = (y[:, :-2, 1:-1] + y[:, 2:, 1:-1] + y[:, 1:-1, :-2] + y[:, 1:-1, 2:] - 4 * y[:, 1:-1, 1:-1])
        out["sharpness"] = lap.reshape(n, -1).var(axis=1, dtype=np.float64)
    else:
        out["sharpness"] = np.full(n, np.nan)
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(mx > 0, (mx - mn) / np.where(mx > 0, mx, 1.0), np.nan)
    with warnings.catch_warnings():  # an all-black frame has no saturation
        warnings.simplefilter("ignore", RuntimeWarning)
        out["saturation"] = np.nanmean(s.reshape(n, -1), axis=1, dtype=np.float64)
    flat = y.reshape(n, -1)
    out["brightness"], out["contrast"] = flat.mean(axis=1, dtype=np.float64), flat.std(axis=1, dtype=np.float64)
    rg = (rgb[..., 0] - rgb[..., 1]).reshape(n, -1)
    yb = (0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]).reshape(n, -1)
    out["colorfulness"] = np.hypot(rg.std(axis=1, dtype=np.float64), yb.std(axis=1, dtype=np.float64)) + \
        0.3 * np.hypot(rg.mean(axis=1, dtype=np.float64), yb.mean(axis=1, dtype=np.float64))
    prev = y[:1] if prev_y is None else prev_y[None]
    ys = np.concatenate([prev, y])
    out["motion"] = np.abs(np.diff(ys, axis=0)).reshape(n, -1).mean(axis=1, dtype=np.float64)
    means = ys.reshape(n + 1, -1).mean(axis=1, dtype=np.float64)
    out["flicker"] = np.abs(np.diff(means))
    if prev_y is None:
        out["motion"][0] = out["flicker"][0] = np.nan
    return out, y[-1]


def frame_measures(frames) -> dict[str, np.ndarray]:
    """Per-frame measures of a video (uint8 [F, H, W, 3], or what mp4.to_uint8_video takes): {name: [F]}."""
    video = to_uint8_video(frames)
    if video.shape[0] == 0:
        raise ValueError("the video has no frames")
    m, _ = _block_measures(video, None)
    return m


def color_histogram(frames) -> np.ndarray:
    """Normalized RGB histogram [HIST_BINS ** 3] of all pixels of uint8 frames [..., 3]."""
    return _normalized(_hist_counts(np.asarray(frames, dtype=np.uint8)))


def _hist_counts(frames: np.ndarray) -> np.ndarray:
    v = (frames.reshape(-1, 3) >> 5).astype(np.int64)  # 256 / HIST_BINS = 32 values per bin
    return np.bincount((v[:, 0] * HIST_BINS + v[:, 1]) * HIST_BINS + v[:, 2], minlength=HIST_BINS ** 3)


def _normalized(counts: np.ndarray) -> np.ndarray:
    return counts / max(1, counts.sum())


def hellinger(p: np.ndarray, q: np.ndarray) -> float:
    """Hellinger distance of two normalized histograms, in [0, 1]."""
    return float(math.sqrt(max(0.0, 1.0 - float(np.sqrt(p * q).sum()))))


def _mean(a: np.ndarray) -> Optional[float]:
    a = a[np.isfinite(a)]
    return float(f"{a.mean():.6g}") if a.size else None


def _bounds(f: int, seg: int) -> list[tuple[int, int]]:
    """Segments [start, stop) of f frames: whole segments, a last piece shorter than half a segment joined
    to the one before it."""
    bounds = [(a, min(f, a + seg)) for a in range(0, f, seg)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < seg / 2:
        bounds[-2:] = [(bounds[-2][0], f)]
    return bounds


def measure_blocks(blocks: Iterable[np.ndarray], segment_frames: int, name: Optional[str] = None) -> dict:
    """The report of a video given as uint8 blocks [n, H, W, 3] (in order): {"video", "num_frames",
    "segment_frames", "segments": [{segment, start, stop, <SEGMENT_MEASURES>}], "drift": {measure: last vs
    first, None with one segment}}."""
    if isinstance(segment_frames, bool) or not isinstance(segment_frames, (int, np.integer)) or segment_frames < 1:
        raise ValueError(f"segment_frames={segment_frames!r}: need an int >= 1")
    seg = int(segment_frames)
    per: dict[str, list] = {m: [] for m in FRAME_MEASURES}
    counts: list[np.ndarray] = []  # per whole-segment index: histogram counts
    prev_y, f = None, 0
    for block in blocks:
        if block.dtype != np.uint8 or block.ndim != 4 or block.shape[-1] != 3:
            raise TypeError(f"blocks must be uint8 [n, H, W, 3]; got {block.dtype} {list(block.shape)}")
        if block.shape[0] == 0:
            continue
        m, prev_y = _block_measures(block, prev_y)
        for k in FRAME_MEASURES:
            per[k].append(m[k])
        for t in range(block.shape[0]):  # each frame's counts into its segment
            k = (f + t) // seg
            if k == len(counts):
                counts.append(np.zeros(HIST_BINS ** 3, np.int64))
            counts[k] += _hist_counts(block[t])
        f += block.shape[0]
    if f == 0:
        raise ValueError(f"{name or 'the video'}: no frames")
    arrays = {k: np.concatenate(v) for k, v in per.items()}
    bounds = _bounds(f, seg)
    if len(bounds) < len(counts):  # the short last piece joined the segment before it
        counts[-2:] = [counts[-2] + counts[-1]]
    first_hist = _normalized(counts[0])
    segments = []
    for k, (a, b) in enumerate(bounds):
        s = {"segment": k, "start": a, "stop": b, **{m: _mean(arrays[m][a:b]) for m in FRAME_MEASURES}}
        s["color_drift"] = float(f"{hellinger(first_hist, _normalized(counts[k])):.6g}")
        segments.append(s)
    drift = {m: None for m in SEGMENT_MEASURES}
    if len(segments) > 1:
        for m in SEGMENT_MEASURES:
            x, y = segments[0][m], segments[-1][m]
            if x is not None and y is not None:
                drift[m] = (float(f"{y / x:.6g}") if x > 0 else None) if m in RATIO_MEASURES else float(f"{y - x:.6g}")
    return {"video": name, "num_frames": f, "segment_frames": seg, "segments": segments, "drift": drift}


def measure_video(frames, segment_frames: int, name: Optional[str] = None) -> dict:
    """measure_blocks of a video held in memory (what mp4.to_uint8_video takes)."""
    video = to_uint8_video(frames)
    return measure_blocks((video[a:a + BLOCK] for a in range(0, video.shape[0], BLOCK)), segment_frames, name)


def _from_two(r: dict) -> dict:
    """No half-width from fewer than 2 values (one value is no certainty)."""
    return r if r["n"] > 1 else {**r, "ci95": None}


def _per_segment(results: list[dict], measure: str, nseg: int) -> np.ndarray:
    """[videos, segments] of one measure (NaN where a video is shorter or the value is undefined)."""
    out = np.full((len(results), nseg), np.nan)
    for i, r in enumerate(results):
        for k, s in enumerate(r["segments"][:nseg]):
            if s[measure] is not None:
                out[i, k] = s[measure]
    return out


def summary(results: list[dict]) -> dict:
    """Per measure, per segment: the mean over videos with its 95% interval."""
    nseg = max(len(r["segments"]) for r in results)
    return {m: [_from_two(interval(col)) for col in _per_segment(results, m, nseg).T] for m in SEGMENT_MEASURES}


def compare(results: list[dict], others: list[dict]) -> dict:
    """Per measure, per segment: the paired difference results - others (the same videos, in order) with
    its 95% interval and the paired t test's p."""
    nseg = min(max(len(r["segments"]) for r in results), max(len(r["segments"]) for r in others))
    out = {}
    for m in SEGMENT_MEASURES:
        d = _per_segment(results, m, nseg) - _per_segment(others, m, nseg)
        out[m] = [_from_two(mean_test(col)) for col in d.T]
    return out


# ----------------------------------------------------------------------------- command line


def _videos(items: Sequence[str], flag: str) -> list[Path]:
    from .cli import collect_videos
    from .config import EvalInputError

    try:
        return collect_videos(items)
    except EvalInputError as e:
        raise BadInput(f"{flag} {e}") from None


def _measure_files(paths: list[Path], args) -> tuple[dict[Path, dict], list[dict]]:
    """The report of each file -> ({path: report}, skipped): a file that cannot be decoded is skipped with
    a warning (listed in the report), as the synthetic evaluation does."""
    results, skipped = {}, []
    for p in paths:
        try:
            fps, blocks = iter_mp4(p, BLOCK)
            seg = args.segment_frames
            if seg is None:
                if not fps or not math.isfinite(fps) or fps <= 0:
                    raise BadInput(f"{p}: the file gives no frame rate; give --segment-frames N")
                seg = max(1, round(args.segment_seconds * fps))
            results[p] = measure_blocks(blocks, seg, name=str(p))
        except VideoReadError as e:  # names the file and why (missing, empty, undecodable)
            reason = str(e).strip().splitlines()[0]
            print(f"warning: skipped {reason}", file=sys.stderr)
            skipped.append({"video": str(p), "reason": reason})
    return results, skipped


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m resampling_forcing.eval.pixel", description=doc_summary(__doc__),
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", nargs="+", help="mp4 files or folders of them")
    p.add_argument("--compare", nargs="+", default=None, metavar="VIDEO",
                   help="a second set (files or folders): each video paired with the one of the same file name")
    p.add_argument("--segment-seconds", type=float, default=None, help="segment length in seconds (default 5)")
    p.add_argument("--segment-frames", type=int, default=None, help="segment length in frames (instead of seconds)")
    p.add_argument("--out", required=True, help="the report (JSON)")
    add_overwrite(p)
    return p


def _unique(paths: list[Path], flag: str) -> None:
    seen = {}
    for p in paths:
        if p.name in seen:
            raise BadInput(f"{flag}: two videos named {p.name} ({seen[p.name]} and {p}); --compare pairs videos by "
                           "file name")
        seen[p.name] = p


def run(args) -> int:
    if args.segment_frames is not None and args.segment_seconds is not None:
        raise BadInput("--segment-seconds and --segment-frames both give the segment length; give one")
    if args.segment_frames is not None and args.segment_frames < 1:
        raise BadInput(f"--segment-frames must be >= 1 (got {args.segment_frames})")
    if args.segment_frames is None and args.segment_seconds is None:
        args.segment_seconds = 5.0
    if args.segment_seconds is not None and not (math.isfinite(args.segment_seconds) and args.segment_seconds > 0):
        raise BadInput(f"--segment-seconds must be a number > 0 (got {args.segment_seconds:g})")
    check_output_file("--out", args.out, (".json",), args.overwrite)
    paths = _videos(args.videos, "videos")
    report = {"segment_seconds": None if args.segment_frames else args.segment_seconds,
              "segment_frames": args.segment_frames}
    if args.compare is not None:
        others = _videos(args.compare, "--compare")
        _unique(paths, "videos")
        _unique(others, "--compare")
        other = {p.name: p for p in others}
        missing = [p.name for p in paths if p.name not in other]
        if missing:
            raise BadInput(f"--compare: no video named {missing[0]} there (videos are paired by file name)")
        unmatched = sorted(set(other) - {p.name for p in paths})
        if unmatched:
            print(f"warning: --compare videos without a partner, not used: {', '.join(unmatched)}", file=sys.stderr)
        paths_b = [other[p.name] for p in paths]
    results, skipped = _measure_files(paths, args)
    if args.compare is not None:
        results_b, skipped_b = _measure_files(paths_b, args)
        skipped += skipped_b
        pairs = [(p, q) for p, q in zip(paths, paths_b) if p in results and q in results_b]  # whole pairs only
        if not pairs:
            raise BadInput("no pair of readable videos to compare (see the warnings)")
        a, b = [results[p] for p, _ in pairs], [results_b[q] for _, q in pairs]
        report.update(videos=a, summary=summary(a), compare_videos=b, compare_summary=summary(b),
                      difference=compare(a, b))
    else:
        if not results:
            raise BadInput("no readable video (see the warnings)")
        report.update(videos=list(results.values()), summary=summary(list(results.values())))
    report["skipped"] = skipped
    atomic_write_text(args.out, json.dumps(report, indent=2, allow_nan=False) + "\n")  # never a NaN in the file
    _print_table(report)
    return 0


def _print_table(report: dict) -> None:
    key = "difference" if "difference" in report else "summary"
    rows = report[key]
    head = "videos - compare" if key == "difference" else "mean over videos"
    print(f"per segment, {head} (+- the 95% interval):", file=sys.stderr)
    for m in SEGMENT_MEASURES:
        cells = ["-" if c["mean"] is None else f"{c['mean']:+.4g}" + ("" if c["ci95"] is None else f" +- {c['ci95']:.2g}")
                 for c in rows[m]]
        print(f"  {m:13s} " + " | ".join(cells), file=sys.stderr)


def main(argv=None) -> int:
    return run_cli(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
