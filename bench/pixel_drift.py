#!/usr/bin/env python
"""Do the model-free drift measures (resampling_forcing/eval/pixel.py) see what Resampling Forcing changes?

    OMP_NUM_THREADS=1 python bench/pixel_drift.py --runs outputs/ablation/cpu_seed1_mix,outputs/ablation/cpu_seed2_mix \\
        --arms tf,ar_1step --protocol sliding --clips 32 --out outputs/bench/pixel_drift.json

On the synthetic world the object metrics (eval/metrics.py) know the truth; on real video only pixel
statistics are left. This continues the ablation's held-out eval clips (its preset: given chunks, sampler
noise, segments of one training clip) with two arms of each ablation folder in `--runs` (RUN/arms/NAME),
under the `--protocol`'s attention, and reports per segment, for both arms and the true clips: every pixel
measure and the object fidelity / collapse; the paired difference (second arm - first) over clips, pooled over
the runs (a clip-level interval: the runs' own spread is not separated); and, over every continuation, the
correlation of each pixel measure's extrapolation mean (segments after the first) with object fidelity's.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import BadInput, OneLineParser, check_out, positive_int, run_main  # noqa: E402


def _extrapolation(per_clip_segments: np.ndarray) -> np.ndarray:
    from resampling_forcing.ablation_eval import extrapolation_mean

    return extrapolation_mean(per_clip_segments)


def _pixel_arrays(videos, seg: int) -> dict[str, np.ndarray]:
    """{measure: [clips, segments]} of eval/pixel.py."""
    from resampling_forcing.eval.pixel import SEGMENT_MEASURES, measure_video

    reports = [measure_video(v, seg) for v in videos]
    return {m: np.array([[np.nan if s[m] is None else s[m] for s in r["segments"]] for r in reports])
            for m in SEGMENT_MEASURES}


def _main(argv=None):
    p = OneLineParser(prog="bench/pixel_drift.py", description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, help="comma list of ablation folders (each with arms/NAME)")
    p.add_argument("--arms", default="tf,ar_1step", help="two arm names: the difference is second - first")
    p.add_argument("--protocol", default="sliding", help="the inference attention (ablation_report.PROTOCOLS)")
    p.add_argument("--clips", type=positive_int, default=32)
    p.add_argument("--out", default=None, help="the report (JSON)")
    args = p.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if len(arms) != 2:
        raise BadInput(f"--arms {args.arms!r}: two arm names (the difference is second - first)")
    runs = [Path(r.strip()) for r in args.runs.split(",") if r.strip()]
    for r in runs:
        for a in arms:
            if not (r / "arms" / a).is_dir():
                raise BadInput(f"--runs: {r / 'arms' / a} is not there (an ablation folder with that arm trained)")
    check_out("--out", args.out, (".json",))
    from resampling_forcing.ablation import PRESETS
    from resampling_forcing.ablation_eval import continue_clips, eval_clips, metric_arrays, score
    from resampling_forcing.ablation_report import PROTOCOLS, protocol_routing
    from resampling_forcing.attention.routing import RoutingSpec
    from resampling_forcing.config import synthetic_seed
    from resampling_forcing.eval.pixel import SEGMENT_MEASURES
    from resampling_forcing.io import atomic_write_json
    from resampling_forcing.pipeline import Pipeline
    from resampling_forcing.stats import interval, sig, t_test

    if args.protocol not in PROTOCOLS:
        raise BadInput(f"--protocol {args.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    preset = PRESETS["cpu"]
    per_arm = {a: {} for a in arms}  # arm -> measure -> [clips over runs, segments]
    truth_pixels = None
    for run in runs:
        pipes = {a: Pipeline.from_pretrained(run / "arms" / a, device="cpu") for a in arms}
        world = pipes[arms[0]].config
        seg = world.data.num_frames
        clips = eval_clips(world.data, args.clips, seg * preset.eval_segments, synthetic_seed(world))
        spec = protocol_routing(args.protocol, world)
        routing = RoutingSpec(*spec) if spec is not None else "dense"
        if truth_pixels is None:
            truth_pixels = _pixel_arrays([v for v, _ in clips], seg)
        for a in arms:
            videos = continue_clips(pipes[a], clips, preset.given_chunks, routing=routing, seed=preset.sample_seed)
            objects = metric_arrays(score(videos, clips, seg))
            arrays = {**_pixel_arrays(videos, seg), "object_fidelity": objects["object_fidelity"],
                      "collapse": objects["collapse"]}
            for m, v in arrays.items():
                per_arm[a][m] = v if m not in per_arm[a] else np.concatenate([per_arm[a][m], v])
            print(f"{run.name} {a}: fidelity per segment {np.round(np.nanmean(objects['object_fidelity'], 0), 3).tolist()}",
                  flush=True)
    measures = (*SEGMENT_MEASURES, "object_fidelity", "collapse")
    first, second = arms
    report = {"runs": [str(r) for r in runs], "arms": arms, "protocol": args.protocol, "clips_per_run": args.clips,
              "segment_frames": seg, "per_segment": {}, "difference": {}, "extrapolation_difference": {},
              "correlation_with_fidelity": {}}
    for m in measures:
        report["per_segment"][m] = {a: [interval(c) for c in per_arm[a][m].T] for a in arms}
        if m in truth_pixels:
            report["per_segment"][m]["truth"] = [interval(c) for c in truth_pixels[m].T]
        d = per_arm[second][m] - per_arm[first][m]
        report["difference"][m] = [{**interval(c), "p": sig(t_test(c))} for c in d.T]
        e = _extrapolation(per_arm[second][m]) - _extrapolation(per_arm[first][m])
        report["extrapolation_difference"][m] = {**interval(e), "p": sig(t_test(e))}
    fid = np.concatenate([_extrapolation(per_arm[a]["object_fidelity"]) for a in arms])
    for m in SEGMENT_MEASURES:
        x = np.concatenate([_extrapolation(per_arm[a][m]) for a in arms])
        ok = np.isfinite(x) & np.isfinite(fid)
        report["correlation_with_fidelity"][m] = round(float(np.corrcoef(x[ok], fid[ok])[0, 1]), 3) if ok.sum() > 2 else None
    print(f"{second} - {first}, extrapolation mean (segments after the first), {len(runs)} runs x {args.clips} clips:")
    for m in measures:
        r = report["extrapolation_difference"][m]
        corr = report["correlation_with_fidelity"].get(m)
        print(f"  {m:15s} {r['mean']:+.4g} +- {r['ci95']:.2g} (p {r['p']})"
              + ("" if corr is None else f"   r with fidelity {corr:+.2f}"))
    if args.out:
        atomic_write_json(Path(args.out), report)
    return 0


def main(argv=None) -> int:
    return run_main(_main, "bench/pixel_drift.py", argv)


if __name__ == "__main__":
    sys.exit(main())
