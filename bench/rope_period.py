#!/usr/bin/env python
"""Object fidelity frame by frame over continuations far beyond the training length, and its period.

    OMP_NUM_THREADS=1 python bench/rope_period.py --checkpoint assets/ablation/ar_0.6 \\
        --routing dense,sink1_window4,window5 --frames 192 --clips 32 --out outputs/bench/rope_period.json

The ablation's per-segment fidelity alternates between even and odd 12-frame segments (docs/results.md).
This continues the ablation's held-out eval clips from their first chunk (ablation_eval.continue_clips,
sampler noise (0, i) per clip), scores object fidelity on every frame (eval.evaluate_video, segments of
one frame), averages over clips and finds the strongest period of the curve beyond the first training
clip (a periodogram over 8-60 frames). It prints the periods 2 pi / f of the RoPE frame-axis
frequencies f of the checkpoint's heads next to it: a sink-only far history (sink 1 + window 4) that
oscillates at one of them, while a window without the sink does not, says that how well the model
reads the far chunk depends on the rotary phase of a relative distance it never saw in training.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import BadInput, OneLineParser, doc_summary, check_checkpoint, check_out, positive_int, run_main  # noqa: E402

SCORED = ("psnr", "motion_score", "color_acc", "collapse")  # scored against the truth, per training clip
ROUTINGS = {"dense": None, "sink1_window4": ("window", None, 1, 4), "window5": ("window", None, 0, 5),
            "top1": ("topk", 1, 0, 0), "top5": ("topk", 5, 0, 0)}


def peak_period(curve: np.ndarray, lo: float = 8.0, hi: float = 60.0, step: float = 0.5) -> tuple[float, float]:
    """(period in frames, power) of the strongest sinusoid in the mean-removed curve [frames]."""
    x = curve - curve.mean()
    t = np.arange(x.size)
    best = (lo, -1.0)
    for p in np.arange(lo, hi + step / 2, step):
        w = 2 * math.pi / p
        power = float(((x * np.cos(w * t)).sum() ** 2 + (x * np.sin(w * t)).sum() ** 2) / x.size)
        best = max(best, (float(p), power), key=lambda b: b[1])
    return best


def _scores(videos, clips, seg: int, frames: int) -> tuple[dict, dict]:
    """Object fidelity of every frame (averaged over clips: the curve, its period, its per-segment means;
    per clip: the mean beyond the first training clip) and the ablation's metrics against the true
    continuation (per clip, the mean over the segments beyond the first) -> (the JSON row, the unrounded
    per-clip arrays {"fidelity", *SCORED})."""
    from resampling_forcing.ablation_eval import extrapolation_mean, metric_arrays, score
    from resampling_forcing.stats import interval
    from resampling_forcing.eval import evaluate_video

    fid = np.array([[np.nan if s["object_fidelity"] is None else s["object_fidelity"]
                     for s in evaluate_video(v, m["caption"], segment_frames=1)["segments"]]
                    for v, (_, m) in zip(videos, clips)])
    curve = np.nanmean(fid, axis=0)
    period, power = peak_period(curve[seg:])
    per_seg = curve[: frames // seg * seg].reshape(-1, seg).mean(axis=1)
    per_clip = np.nanmean(fid[:, seg:], axis=1)
    metrics = {m: extrapolation_mean(a) for m, a in metric_arrays(score(videos, clips, seg)).items() if m in SCORED}
    row = {"peak_period": period, "peak_power": round(power, 4), "fidelity_beyond_training": interval(per_clip),
           "fidelity_per_segment": [round(float(x), 3) for x in per_seg],
           "fidelity_per_frame": [round(float(x), 4) for x in curve],
           "fidelity_per_clip": [round(float(x), 4) for x in per_clip],
           "metrics": {m: interval(v) for m, v in metrics.items()},
           "metrics_per_clip": {m: [round(float(x), 4) for x in v] for m, v in metrics.items()}}
    return row, {"fidelity": per_clip, **metrics}


def _paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Per-clip difference a - b: mean, 95% t interval and the paired t test's p."""
    from resampling_forcing.stats import mean_test

    return mean_test(a - b)


def rope_periods(pipe) -> list[float]:
    """2 pi / f for the frame-axis RoPE frequencies f of the model's heads (in latent frames)."""
    from resampling_forcing.models.wan import rope_axis_dims

    m = pipe.model.cfg
    d = rope_axis_dims(m.head_dim)[0]
    return [round(2 * math.pi * m.rope_theta ** (i / d), 2) for i in range(0, d, 2)]


def _main(argv=None):
    p = OneLineParser(prog="bench/rope_period.py", description=doc_summary(__doc__))
    p.add_argument("--checkpoint", default="assets/ablation/ar_0.6")
    p.add_argument("--routing", default="dense,sink1_window4,window5", help=f"comma list of {', '.join(ROUTINGS)}")
    p.add_argument("--frames", type=positive_int, default=192, help="frames per continuation (given chunk included)")
    p.add_argument("--clips", type=positive_int, default=32)
    p.add_argument("--rope-horizon", default="none",
                   help="comma list of far-history positions to run each routing under: none (absolute positions), "
                   "train (horizon = the training clip's chunks - 1), H (horizon H chunks) or H:D (history beyond H "
                   "chunks read at D chunks back); each is compared per clip with 'none' when that ran first")
    p.add_argument("--split", default="eval", choices=["eval", "validation"],
                   help="which held-out clip set (choose a setting on validation, report it on eval)")
    p.add_argument("--out", default=None, help="write the per-frame curves and periods as JSON here")
    args = p.parse_args(argv)
    routings = [r.strip() for r in args.routing.split(",") if r.strip()]
    bad = [r for r in routings if r not in ROUTINGS]
    if bad or not routings:
        raise BadInput(f"--routing {args.routing!r}: choose from {', '.join(ROUTINGS)}")
    horizons = [h.strip() for h in args.rope_horizon.split(",") if h.strip()]
    if not horizons or any(h not in ("none", "train") and not all(x.isdigit() and int(x) >= 1 for x in h.split(":", 1))
                           for h in horizons):
        raise BadInput(f"--rope-horizon {args.rope_horizon!r}: a comma list of none, train, H or H:D (chunks >= 1)")
    check_checkpoint("--checkpoint", args.checkpoint)
    check_out("--out", args.out, (".json",))
    from resampling_forcing.ablation_eval import continue_clips, eval_clips
    from resampling_forcing.attention.routing import RoutingSpec
    from resampling_forcing.io import atomic_write_json
    from resampling_forcing.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.checkpoint, device="cpu")
    pipe.config.attention.rope_horizon = pipe.config.attention.rope_far_at = None  # "none" = absolute, whatever
    # the checkpoint's config says
    seg = pipe.config.data.num_frames
    if args.frames < 3 * seg:
        raise BadInput(f"--frames {args.frames}: at least 3 training clips ({3 * seg}) to see a period")
    clips = eval_clips(pipe.config.data, args.clips, args.frames, split=args.split)
    periods = rope_periods(pipe)
    print(f"RoPE frame-axis periods of {args.checkpoint}: {periods} frames; training clip {seg} frames")
    result = {"checkpoint": args.checkpoint, "frames": args.frames, "clips": args.clips, "split": args.split,
              "rope_periods": periods,
              "training_clip_frames": seg, "routing": {}}
    absolute = {}  # routing -> its unrounded per-clip values at absolute positions
    for name in routings:
        spec = ROUTINGS[name]
        for h in horizons:
            horizon, _, at = h.partition(":")
            horizon = None if h == "none" else horizon if horizon == "train" else int(horizon)
            with torch.no_grad():
                videos = continue_clips(pipe, clips, 1, routing=RoutingSpec(*spec) if spec else "dense", seed=0,
                                        rope_horizon=horizon, rope_far_at=int(at) if at else None)
            row, per_clip = _scores(videos, clips, seg, args.frames)
            row = {"rope_horizon": h, **row}
            key = name if h == "none" else f"{name}@horizon_{h.replace(':', '_at_')}"
            if h == "none":
                absolute[name] = per_clip
            elif name in absolute:  # paired per clip with the absolute run of this routing
                row["vs_absolute"] = _paired(per_clip["fidelity"], absolute[name]["fidelity"])
                row["metrics_vs_absolute"] = {m: _paired(per_clip[m], absolute[name][m]) for m in SCORED}
            result["routing"][key] = row
            print(f"{key}: strongest period {row['peak_period']:g} frames (power {row['peak_power']:.3f}); fidelity "
                  f"beyond the training clip {row['fidelity_beyond_training']}"
                  f"{'; vs absolute ' + str(row['vs_absolute']) if 'vs_absolute' in row else ''}; "
                  f"per {seg}-frame segment {[round(x, 2) for x in row['fidelity_per_segment']]}", flush=True)
            print(f"  {key} vs the true continuation: {row['metrics']}"
                  f"{'; vs absolute ' + str(row['metrics_vs_absolute']) if 'metrics_vs_absolute' in row else ''}",
                  flush=True)
    if args.out:
        atomic_write_json(Path(args.out), result)
    return 0


def main(argv=None) -> int:
    return run_main(_main, "bench/rope_period.py", argv)


if __name__ == "__main__":
    sys.exit(main())
