"""Command line of the drift evaluation: collect mp4 files, their captions and references, report.

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
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from ..data.synthetic import parse_caption
from ..cli import BadInput, OneLineParser, add_overwrite, check_output_file, run_cli
from ..io import atomic_write_json
from ..mp4 import VideoReadError, read_mp4
from .config import EvalConfig, EvalInputError, check_segment_frames
from .metrics import evaluate_video, mean_or_none, mean_over_videos, reference_meta_problem
from .report import plot_drift, summary_table


def collect_videos(items: Sequence[str]) -> list[Path]:
    """The mp4 files named by `items` (files, or folders of them: not hidden, sorted); EvalInputError (one
    line) for a missing path or a folder without any."""
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


def _read_video(path: Path):
    """uint8 ``[F, H, W, 3]`` frames of an mp4; an unreadable file is bad input (one line, exit 2)."""
    try:
        return read_mp4(path)
    except VideoReadError as e:
        raise EvalInputError(str(e)) from None


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


def _reference_for(video: Path, refs: list[Path] | None, sidecar: dict | None, videos: int = 1) -> Path | None:
    """The reference of `video`: the file of the same name in --reference, or, for ONE evaluated video and
    one reference file, that file whatever its name; else the sidecar's 'reference'."""
    if refs:
        for r in refs:
            cand = r / video.name if r.is_dir() else r
            if cand.is_file() and cand.name == video.name:
                return cand
        if len(refs) == 1 and refs[0].is_file() and videos == 1:
            return refs[0]
        raise EvalInputError(f"{video}: no reference video named {video.name} in --reference")
    if sidecar is not None and isinstance(sidecar.get("reference"), str):
        p = Path(sidecar["reference"])
        p = p if p.is_absolute() else video.parent / p
        if not p.is_file():
            raise EvalInputError(f"{video.with_suffix('.json')}: reference {p} not found")
        return p
    return None


def _reference_meta(ref: Path | None, what: str) -> dict | None:
    """The generator metadata next to a reference video (X.json with per-frame objects: true centres), or
    None (no JSON, or one without frames: the centres come from the reference's pixels). A JSON whose
    frames are something else (a sample.py sidecar: a frame count) is refused, not misread."""
    mp = None if ref is None else ref.with_suffix(".json")
    if mp is None or not mp.is_file():
        return None
    meta = _load_json(mp, "reference metadata")
    if not isinstance(meta, dict) or not meta.get("frames"):
        return None
    problem = reference_meta_problem(meta)
    if problem:
        raise EvalInputError(f"{what} {mp}: not generator metadata (no per-frame objects: {problem}); move it "
                             f"aside to score against the pixels of {ref.name}")
    return meta


def evaluate_paths(
    videos: Sequence[str],
    captions: str = "sidecar",
    caption: str | None = None,
    references: Sequence[str] | None = None,
    segment_frames: int | None = None,
    config: EvalConfig | None = None,
) -> dict:
    """Evaluate mp4 files/folders; return ``{"segment_frames", "config", "videos", "mean", "overall",
    "skipped"}`` (videos that could not be decoded: named in a warning and left out of the means)."""
    check_segment_frames(segment_frames)
    paths = collect_videos(videos)
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
    jobs = []  # every caption, reference and its metadata resolved before any video is decoded or scored
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
        ref_path = _reference_for(v, refs, side, len(paths))
        jobs.append((v, cap, ref_path, _reference_meta(ref_path, "--reference" if refs else "reference")))
    results, skipped = [], []
    for v, cap, ref_path, ref_meta in jobs:
        try:  # one undecodable file (or reference) is skipped and named, as training skips a bad video
            frames = _read_video(v)
            ref_frames = _read_video(ref_path) if ref_path is not None else None
        except EvalInputError as e:
            skipped.append({"video": str(v), "reason": str(e)})
            print(f"warning: skipping {v}: {e}", file=sys.stderr)
            continue
        results.append(
            evaluate_video(frames, cap, segment_frames, reference=ref_frames, reference_meta=ref_meta, config=config, name=str(v))
        )
    if not results:
        raise EvalInputError(f"no video could be decoded ({len(skipped)} skipped; first: {skipped[0]['reason']})")
    overall = {}
    for key in results[0]["overall"]:
        if key in ("start", "stop"):
            continue
        overall[key] = mean_or_none([r["overall"].get(key) for r in results])
    return {
        "segment_frames": results[0]["segment_frames"] if segment_frames is None else int(segment_frames),
        "config": json.loads(json.dumps(asdict(config or EvalConfig()), default=list)),
        "videos": results,
        "mean": mean_over_videos(results),
        "overall": overall,
        "skipped": skipped,
    }


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(
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
    add_overwrite(ap, "--out / --plot")
    return ap


def run(args) -> int:
    # outputs first: a bad --out / --plot is refused before any video is read, and never after the JSON
    if args.out is not None:
        check_output_file("--out", args.out, (".json",), args.overwrite)
    if args.plot is not None:
        check_output_file("--plot", args.plot, (".png",), args.overwrite)
    try:
        report = evaluate_paths(args.videos, args.captions, args.caption, args.reference, args.segment_frames)
    except EvalInputError as e:
        raise BadInput(str(e)) from None
    if args.out:
        atomic_write_json(args.out, report)
    if args.plot:
        plot_drift(report["videos"], args.plot)
    if args.out:
        print(summary_table(report))
        print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    else:
        print(json.dumps(report, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser, run, argv, BadInput, "eval")
