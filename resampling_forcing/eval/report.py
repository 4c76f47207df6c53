"""Drift report of evaluated videos: the per-segment plot and the text table the CLI prints."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..figures import save_figure
from .config import SCORE_KEYS
from .metrics import mean_over_videos


def _series(means: list[dict], key: str) -> list[float]:
    """``key`` of each segment mean, NaN where undefined (a gap in the plotted line)."""
    return [m.get(key) if m.get(key) is not None else np.nan for m in means]


def plot_drift(results: list[dict], path: str | os.PathLike, title: str | None = None) -> Path:
    """PNG of the per-segment means over videos: scores (left) and PSNR / speed (right)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    means = mean_over_videos(results)
    seg = results[0]["segment_frames"] if results else 1
    xs = [m["segment"] for m in means]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in (*SCORE_KEYS, "quality"):
        axes[0].plot(xs, _series(means, key), marker="o", label=key, lw=2.5 if key == "quality" else 1.5)
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].set_xlabel(f"segment ({seg} frames each)")
    axes[0].set_ylabel("score (higher is better)")
    axes[0].legend(fontsize=7, loc="lower left")
    axes[0].grid(alpha=0.3)
    if any(m.get("psnr") is not None for m in means):
        axes[1].plot(xs, _series(means, "psnr"), marker="o", label="PSNR vs reference")
        axes[1].set_ylabel("PSNR (dB)")
        if any(m.get("center_error") is not None for m in means):
            ax2 = axes[1].twinx()
            ax2.plot(xs, _series(means, "center_error"), marker="s", color="C3", label="centre error")
            ax2.set_ylabel("centre error (px)", color="C3")
    else:
        axes[1].plot(xs, _series(means, "mean_speed"), marker="o", label="mean speed (px/frame)")
        axes[1].plot(xs, _series(means, "mean_accel"), marker="s", label="mean |accel| (px/frame^2)")
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


def summary_table(report: dict) -> str:
    """Fixed-width table of the per-segment means of an evaluate_paths report (scores, PSNR when known)."""
    keys = [*SCORE_KEYS, "quality"]
    if any("psnr" in m for m in report["mean"]):
        keys += ["psnr", "center_error"]
    head = "segment  frames    " + "  ".join(f"{k[:12]:>12}" for k in keys)
    lines = [head]
    for m in report["mean"]:
        vals = "  ".join(f"{m[k]:12.3f}" if isinstance(m.get(k), float) else f"{'-':>12}" for k in keys)
        lines.append(f"{m['segment']:7d}  {m['start']:>4}-{m['stop']:<4} {vals}")
    return "\n".join(lines)
