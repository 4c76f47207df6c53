"""The on-disk bouncing-shapes data set (data/synthetic.py draws and renders the scenes).

``make_dataset(out_dir, num_videos, ...)`` writes ``videos/*.mp4`` + ground-truth metadata, a
``manifest.jsonl`` and ``dataset.json``; idempotent and resumable. Its "test" split shows only held-out
object combinations (``held_out_combos``: never in "train", so held-out captions test composition);
optional blackouts (``check_blackout_law``, ``BLACKOUT_MARGIN``) hide the whole scene for a few frames.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import signal
from pathlib import Path
from typing import Sequence

import numpy as np

from .synthetic import (DEFAULT_COLORS, DEFAULT_SHAPES, FORMAT_VERSION, SceneSpec, _hw, combo_key, make_caption,
                        render, sample_scene)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
INFO_NAME = "dataset.json"  # the data set's parameters and counts
BLACKOUT_MARGIN = 2  # visible frames a data set's blackout leaves before and after it
RENDER_LOCK = ".render.lock"  # held by make_dataset (its own name: the folder may also be a run folder)


def _write_if_changed(path: Path, text: str) -> None:
    """A complete data set is not rewritten (it may be read-only, or read by a running trainer)."""
    from ..io import atomic_write_text

    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)


def all_combos(colors: Sequence[str], shapes: Sequence[str], max_objects: int) -> list[tuple]:
    """Every order-free scene content with 1..max_objects objects of distinct colours."""
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
    from ..io import atomic_write_json, clean_folder_temps, folder_lock
    from ..mp4 import write_mp4
    from ..signals import GracefulStop

    if num_videos < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if not 0 <= held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    blackout_frames = tuple(int(x) for x in blackout_frames)
    check_blackout_law(frames, blackout_prob, blackout_frames)
    out = Path(out_dir)
    if (out / MANIFEST_NAME).is_file() and not (out / INFO_NAME).is_file():
        # the renderer writes its INFO_NAME before its manifest: this one is somebody's own data set
        raise ValueError(f"{out} holds a {MANIFEST_NAME} that the synthetic renderer did not write (no {INFO_NAME}): "
                         "rendering there would overwrite its videos; point data.synthetic_dir at an empty or "
                         "synthetic folder (or use data.source=manifest for your videos)")
    vdir = out / "videos"
    vdir.mkdir(parents=True, exist_ok=True)
    # One renderer at a time (runs sharing data.synthetic_dir wait for each other); under the lock a
    # temporary is a killed renderer's (SIGTERM, kill -9 skip atomic_path's cleanup) and can go.
    # Ctrl+C sets a flag checked before each video: a KeyboardInterrupt raised by Python's own handler
    # could land in the parent's after-fork hooks of an ffmpeg writer, where CPython prints and drops it.
    ctrl_c = GracefulStop("stopping after the video in progress (the rendered ones are kept)",
                          "stopped rendering", signals=(signal.SIGINT,))
    with folder_lock(out, RENDER_LOCK, f"another process is rendering {out}") as locked, ctrl_c:
        if locked:
            for folder in (out, vdir):
                clean_folder_temps(folder)
        held_out = held_out_combos(colors, shapes, max_objects, held_out_fraction, seed)
        it = range(num_videos)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="synthetic videos")
        rows = []
        made = 0
        for i in it:
            if ctrl_c.requested:
                raise KeyboardInterrupt  # as Python's own handler would: the callers' Ctrl+C path
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
        # the info first, then the manifest: a manifest without an info file is not ours (checked above)
        _write_if_changed(
            out / INFO_NAME,
            json.dumps({
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
            }, indent=2) + "\n",
        )
        manifest = out / MANIFEST_NAME
        _write_if_changed(manifest, "".join(json.dumps(r) + "\n" for r in rows))
    logger.info("synthetic data set %s: %d videos (%d rendered, %d reused)", out, num_videos, made, num_videos - made)
    return manifest
