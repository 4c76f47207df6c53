"""Long-continuation evaluation for the ablation (ablation.py): what exposure bias touches.

Held-out clips of the synthetic world (generator seeds from ``HELD_OUT_SEED_BASES[split]``: the eval,
calibration and validation sets are disjoint, and none is ever in a training set;
scenes whose object combination the data set holds out for composition tests are skipped, so every
clip shows a combination the model trained on) are rendered ``frames`` long (8x the training
clip). A model is given the first ``given_chunks`` chunks (VAE-encoded, as ``--init-video``) and
continues to the end; every segment of ``segment_frames`` frames (the training clip length) is
scored against the true continuation with eval.evaluate_video:

- ``psnr`` (dB) and ``center_error`` (px, found objects vs their true centres) against the truth;
- object fidelity (``object_fidelity``, ``count_acc``, ``color_acc``, ``shape_acc``) and
  ``background_clean`` against the caption;
- ``motion_score``: objects move as the world's physics does (a frozen continuation scores 0);
- ``collapse``: 1 when a segment's object_fidelity < 0.5 or background_clean < 0.5 (objects lost or
  merged, or most of the background dissolved), else 0. (Pixel noise of std 0.1 on the truth gives
  background_clean 0.75: the threshold is below what a noisy but intact frame scores.)

Statistics over clips: per segment the mean with a 95% t interval mean +- t(n-1) sd / sqrt(n); arms are
also compared PAIRED (same clips, same sampler seeds) on the mean over the extrapolation segments
(every segment after the first, i.e. beyond the training length).

``sanity_check`` first shows that the metrics separate good from bad continuations in this world:
the true continuation against a frozen one (last given frame repeated), another scene's, and the
truth with pixel noise.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import figures
from .data.synthetic import HELD_OUT_SEED_BASE, HELD_OUT_SEED_BASES, HELD_OUT_SET_SIZE, combo_key, generate_clip, parse_caption
from .data.synthetic_dataset import held_out_combos
from .eval import evaluate_video
from .stats import interval, t_test

__all__ = ["HELD_OUT_SEED_BASE", "METRICS", "eval_clips", "continue_clips", "score", "metric_arrays", "summarize",
           "paired", "extrapolation_mean", "sanity_check", "plot_metric", "contact_sheet"]  # the statistics: stats.py

METRICS = ("psnr", "center_error", "object_fidelity", "count_acc", "color_acc", "shape_acc", "motion_score",
           "background_clean", "collapse")
HIGHER_IS_BETTER = {m: m not in ("center_error", "collapse") for m in METRICS}
COLLAPSE_FIDELITY, COLLAPSE_BACKGROUND = 0.5, 0.5


def eval_clips(data_cfg, num: int, frames: int, dataset_seed: int = 0,
               blackout: Optional[tuple[int, int]] = None, split: str = "eval") -> list[tuple[np.ndarray, dict]]:
    """``num`` held-out clips of the world ``data_cfg`` describes (size, max objects), ``frames`` long:
    [(uint8 [frames, H, W, 3], generator metadata with "caption")]. Deterministic. ``blackout``:
    (start, length) frames of every clip that show the background only (ablation_memory.py). ``split``:
    which disjoint held-out set (HELD_OUT_SEED_BASES: eval, calibration, validation)."""
    if split not in HELD_OUT_SEED_BASES:
        raise ValueError(f"split {split!r}: choose one of {', '.join(HELD_OUT_SEED_BASES)}")
    held = set(held_out_combos(max_objects=data_cfg.synthetic_max_objects, seed=dataset_seed))
    out, seed = [], HELD_OUT_SEED_BASES[split]
    while len(out) < num:
        if seed >= HELD_OUT_SEED_BASES[split] + HELD_OUT_SET_SIZE:  # the next set starts there
            raise ValueError(f"{num} clips do not fit in the held-out {split} set ({HELD_OUT_SET_SIZE} seeds)")
        video, meta = generate_clip(seed, frames=frames, size=(data_cfg.height, data_cfg.width),
                                    max_objects=data_cfg.synthetic_max_objects, blackout=blackout)
        seed += 1
        if combo_key(parse_caption(meta["caption"])) not in held:
            out.append((video, meta))
    return out


@torch.no_grad()
def continue_clips(pipe, clips: Sequence[tuple[np.ndarray, dict]], given_chunks: int, routing=None,
                   seed: int = 0, batch: int = 32, rope_horizon=None, rope_far_at=None) -> np.ndarray:
    """Continue each clip from its first ``given_chunks`` chunks to its full length with ``pipe``'s
    sampler (config settings; ``routing`` a RoutingSpec or None = the config's; ``rope_horizon`` and
    ``rope_far_at`` None = the config's). Sample i uses the noise of (seed, i) whatever the batching, so
    arms see the same noise. -> uint8 [B, F, H, W, 3]."""
    total = clips[0][0].shape[0]
    given = pipe.vae.frames_for_latents(given_chunks * pipe.chunk_frames)
    new_chunks = pipe.vae.latents_for_frames(total) // pipe.chunk_frames - given_chunks
    out = []
    for lo in range(0, len(clips), batch):
        part = clips[lo:lo + batch]
        history = torch.cat([pipe.load_init_video(v[:given])[0] for v, _ in part])
        res = pipe.generate([m["caption"] for _, m in part], new_chunks, seed=seed,
                            indices=list(range(lo, lo + len(part))), init_latents=history, routing=routing,
                            rope_horizon=rope_horizon, rope_far_at=rope_far_at, progress=True)
        out.extend(res.video[i].numpy()[:total] for i in range(len(part)))
    return np.stack(out)


def score(videos: np.ndarray, clips: Sequence[tuple[np.ndarray, dict]], segment_frames: int) -> list[dict]:
    """evaluate_video of each continuation against its clip (truth frames and metadata)."""
    return [evaluate_video(v, meta["caption"], segment_frames=segment_frames, reference=truth, reference_meta=meta,
                           name=f"clip{i:03d}") for i, (v, (truth, meta)) in enumerate(zip(videos, clips))]


def metric_arrays(results: list[dict]) -> dict[str, np.ndarray]:
    """{metric: [clips, segments] float (NaN where undefined)} for METRICS, collapse derived."""
    def arr(key):
        return np.array([[np.nan if s.get(key) is None else float(s[key]) for s in r["segments"]] for r in results])

    out = {m: arr(m) for m in METRICS if m != "collapse"}
    fid, bg = out["object_fidelity"], out["background_clean"]
    out["collapse"] = ((np.nan_to_num(fid, nan=0.0) < COLLAPSE_FIDELITY) |
                       (np.nan_to_num(bg, nan=0.0) < COLLAPSE_BACKGROUND)).astype(float)
    return out


def cache_key(checkpoint, **settings) -> str:
    """What a cached evaluation (OUT/eval/*.npz) depends on: the checkpoint's weight files (path, size,
    modification time) and what reading them reads besides (a LoRA checkpoint keeping only adapters: its
    base's, models.loading.weight_files), the metrics' version and the evaluation settings. A cache whose key
    differs is evaluated again."""
    from .eval.metrics import METRICS_VERSION
    from .models.loading import CheckpointError, detect_layout, weight_files

    ck = Path(checkpoint)
    files = sorted(ck.rglob("*.safetensors")) if ck.is_dir() else ([ck] if ck.is_file() else [])
    for folder in sorted({p.parent for p in files}):
        try:  # a base rewritten in place changes the key
            files += [p for p in weight_files(*detect_layout(folder)) if p not in files]
        except CheckpointError:  # no checkpoint there, or its base is gone: its own files are the key
            pass
    weights = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return json.dumps({"weights": weights, "metrics": METRICS_VERSION, **settings}, sort_keys=True, default=str)


def cached(path: Path, key: str) -> bool:
    """True when `path` holds an evaluation made with `key` (an older cache without a key is not)."""
    if not path.is_file():
        return False
    with np.load(path) as z:
        return "key" in z.files and str(z["key"]) == key


def summarize(arrays: dict[str, np.ndarray]) -> dict[str, list[dict]]:
    """{metric: per segment {mean, ci95, n}} (95% interval half-width over clips)."""
    return {m: [interval(a[:, k]) for k in range(a.shape[1])] for m, a in arrays.items()}


def extrapolation_mean(a: np.ndarray) -> np.ndarray:
    """[clips]: each clip's mean over the segments after the first (beyond the training length)."""
    tail = a[:, 1:] if a.shape[1] > 1 else a
    with warnings.catch_warnings():  # all-NaN rows (e.g. no centre ever found) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(tail, axis=1)


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Paired difference a - b of per-clip extrapolation means (same clips): {mean, ci95, n, p}, p the
    two-sided paired t test's (`t_test`, unrounded: adjust it before rounding with `sig`)."""
    d = extrapolation_mean(a) - extrapolation_mean(b)
    return {**interval(d), "p": t_test(d)}


def sanity_check(clips: Sequence[tuple[np.ndarray, dict]], given_frames: int, segment_frames: int,
                 noise: float = 0.1, seed: int = 0) -> dict:
    """Metrics (extrapolation mean with interval) of known-good and known-bad continuations:
    truth; truth + N(0, noise) pixel noise; frozen (the last given frame repeated); another scene
    (the next clip's true frames, scored against this clip's caption and truth)."""
    rng = np.random.default_rng(seed)
    truth = np.stack([v for v, _ in clips])
    noisy = np.clip(truth / 255.0 + rng.normal(0.0, noise, truth.shape), 0, 1)
    frozen = truth.copy()
    frozen[:, given_frames:] = truth[:, given_frames - 1:given_frames]
    other = np.concatenate([truth[1:], truth[:1]])
    cases = {"truth": truth, f"truth + noise {noise:g}": (noisy * 255).round().astype(np.uint8),
             "frozen": frozen, "other scene": other}
    out = {}
    for name, vids in cases.items():
        arrays = metric_arrays(score(vids, clips, segment_frames))
        out[name] = {m: interval(extrapolation_mean(a)) for m, a in arrays.items()}
    return out


def plot_metric(summaries: dict[str, dict], metric: str, segment_frames: int, path: Path,
                title: Optional[str] = None) -> Path:
    """One line per arm (mean, shaded 95% interval) of ``metric`` over segments."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for arm, summ in summaries.items():
        st = summ[metric]
        xs = [k for k, s in enumerate(st) if s["mean"] is not None]
        if not xs:
            continue
        m = np.array([st[k]["mean"] for k in xs])
        c = np.array([st[k]["ci95"] for k in xs])
        ax.plot(xs, m, marker="o", ms=3, label=arm)
        ax.fill_between(xs, m - c, m + c, alpha=0.15)
    ax.set_xlabel(f"segment ({segment_frames} frames = one training clip; 0 holds the given frames)")
    arrow = "higher is better" if HIGHER_IS_BETTER.get(metric, True) else "lower is better"
    ax.set_ylabel(f"{metric} ({arrow})")
    ax.set_title(title or metric)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return figures.save_figure(fig, path, dpi=110)


def contact_sheet(videos: np.ndarray, truth: np.ndarray, every: int, path: Path, rows: int = 4, scale: int = 2) -> Path:
    """PNG: for the first ``rows`` clips, the truth (upper) and the continuation (lower), one frame
    every ``every`` frames plus the last; white gaps between frames and clip pairs."""
    n = min(rows, len(videos))
    return figures.contact_sheet([x for r in range(n) for x in (truth[r], videos[r])], path, every=every, scale=scale,
                             last=True, margin=0, pairs=True)
