#!/usr/bin/env python
"""Do the model-free drift measures (resampling_forcing/eval/pixel.py) see what Resampling Forcing changes?

    OMP_NUM_THREADS=1 python bench/pixel_drift.py --runs outputs/ablation/cpu_seed1_mix,outputs/ablation/cpu_seed2_mix \\
        --arms tf,ar_1step --protocol sliding --clips 32 --out outputs/bench/pixel_drift.json

On the synthetic world the object metrics (eval/metrics.py) know the truth; on real video only pixel
statistics are left. This continues the ablation's held-out eval clips with two arms of each ablation
folder in `--runs` (RUN/arms/NAME) exactly as the ablation evaluates them (its report's preset: given
chunks, sampler noise, segments of one training clip; the `--protocol`'s attention), and checks the object
fidelity it gets against the ablation's own cached evaluation when there is one. It reports per segment,
for both arms and the true clips, every pixel measure and the object fidelity / collapse; per clip, the
paired difference (second arm - first) averaged over the runs (every run continues the same clips with the
same sampler noise, so the clip is the unit: a 95% interval over clips); and over the clips, the
correlation of each pixel measure's difference with the object fidelity's difference (extrapolation means:
the segments after the first), i.e. whether a clip that the method helps more also moves that measure more.
The continuations are kept in OUT.videos.npz (keyed by the arm's weight files and the settings) so a rerun measures
without rolling out again.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import BadInput, OneLineParser, doc_summary, check_out, positive_int, run_main  # noqa: E402
from resampling_forcing.ablation_layout import REPORT_FILE, arm_dir, eval_path  # noqa: E402


def _pixel_arrays(videos, seg: int) -> dict[str, np.ndarray]:
    """{measure: [clips, segments]} of eval/pixel.py."""
    from resampling_forcing.eval.pixel import SEGMENT_MEASURES, measure_video

    reports = [measure_video(v, seg) for v in videos]
    return {m: np.array([[np.nan if s[m] is None else s[m] for s in r["segments"]] for r in reports])
            for m in SEGMENT_MEASURES}


def _fmt(r: dict) -> str:
    if r["mean"] is None:
        return "-"
    return f"{r['mean']:+.4g}" + ("" if r.get("ci95") is None else f" +- {r['ci95']:.2g}") + \
        ("" if r.get("p") is None else f" (p {r['p']})")


def _continuations(run: Path, arms: list[str], protocol: str, clips_n: int, cache: dict) -> tuple:
    """(world config, preset dict, clips, {arm: uint8 videos}) of one ablation folder; videos from `cache`
    when their key is there."""
    from resampling_forcing.ablation_eval import cache_key, continue_clips, eval_clips
    from resampling_forcing.ablation_report import protocol_routing
    from resampling_forcing.attention.routing import RoutingSpec
    from resampling_forcing.config import synthetic_seed
    from resampling_forcing.pipeline import Pipeline, resolve_config

    report = json.loads((run / REPORT_FILE).read_text())
    preset = report["preset"]
    world = resolve_config(arm_dir(run, arms[0]))  # the arms share the world (the ablation's data and clips)
    seg = world.data.num_frames
    clips = eval_clips(world.data, clips_n, seg * preset["eval_segments"], synthetic_seed(world))
    videos = {}
    for a in arms:
        key = hashlib.sha1(cache_key(arm_dir(run, a), protocol=protocol, clips=clips_n, given=preset["given_chunks"],
                                     seed=preset["sample_seed"], segments=preset["eval_segments"]).encode()).hexdigest()
        if key not in cache:  # only a rollout needs the model
            spec = protocol_routing(protocol, world)
            cache[key] = continue_clips(Pipeline.from_pretrained(arm_dir(run, a), device="cpu"), clips,
                                        preset["given_chunks"], routing=RoutingSpec(*spec) if spec is not None else "dense",
                                        seed=preset["sample_seed"])
        videos[a] = cache[key]
    return world, preset, clips, videos


def _main(argv=None):
    p = OneLineParser(prog="bench/pixel_drift.py", description=doc_summary(__doc__))
    p.add_argument("--runs", required=True, help="comma list of ablation folders (each with report.json, arms/NAME)")
    p.add_argument("--arms", default="tf,ar_1step", help="two arm names: the difference is second - first")
    p.add_argument("--protocol", default="sliding", help="the inference attention (ablation_report.PROTOCOLS)")
    p.add_argument("--clips", type=positive_int, default=32)
    p.add_argument("--out", required=True, help="the report (JSON); the continuations go to OUT.videos.npz")
    args = p.parse_args(argv)
    check_out("--out", args.out, (".json",))
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if len(arms) != 2:
        raise BadInput(f"--arms {args.arms!r}: two arm names (the difference is second - first)")
    runs = [Path(r.strip()) for r in args.runs.split(",") if r.strip()]
    for r in runs:
        if not (r / REPORT_FILE).is_file():
            raise BadInput(f"--runs: {r} holds no {REPORT_FILE} (an ablation folder)")
        for a in arms:
            if not arm_dir(r, a).is_dir():
                raise BadInput(f"--runs: {arm_dir(r, a)} is not there (an ablation folder with that arm trained)")
    from resampling_forcing.ablation_eval import extrapolation_mean, metric_arrays, score
    from resampling_forcing.ablation_report import PROTOCOLS
    from resampling_forcing.eval.pixel import SEGMENT_MEASURES
    from resampling_forcing.io import atomic_write_text
    from resampling_forcing.stats import interval, mean_test

    if args.protocol not in PROTOCOLS:
        raise BadInput(f"--protocol {args.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    cache_file = Path(args.out).with_suffix(".videos.npz")
    cache = dict(np.load(cache_file)) if cache_file.is_file() else {}
    n_cached = len(cache)
    per_run = {a: {} for a in arms}  # arm -> measure -> [clips, segments, runs]
    truth, worlds, checks = None, set(), []
    for run in runs:
        world, preset, clips, videos = _continuations(run, arms, args.protocol, args.clips, cache)
        seg = world.data.num_frames
        worlds.add(json.dumps({"data": vars(world.data), "seg": seg, "preset": preset}, default=str, sort_keys=True))
        if len(worlds) > 1:
            raise BadInput(f"--runs: {run} has another world, preset or clips than {runs[0]}; compare like with like")
        if truth is None:
            truth = _pixel_arrays([v for v, _ in clips], seg)
        for a in arms:
            objects = metric_arrays(score(videos[a], clips, seg))
            cached_eval = eval_path(run, a, protocol=args.protocol)
            if cached_eval.is_file():  # the ablation's own evaluation of the same continuations
                with np.load(cached_eval) as z:
                    theirs = z["object_fidelity"][:args.clips]
                    same = theirs.shape == objects["object_fidelity"].shape and np.allclose(
                        theirs, objects["object_fidelity"], equal_nan=True)
                checks.append({"run": str(run), "arm": a, "matches_ablation_eval": bool(same)})
                if not same:
                    print(f"warning: {run} {a}: object fidelity differs from {cached_eval}", file=sys.stderr)
            arrays = {**_pixel_arrays(videos[a], seg), "object_fidelity": objects["object_fidelity"],
                      "collapse": objects["collapse"]}
            for m, v in arrays.items():
                per_run[a].setdefault(m, []).append(v)
            print(f"{run.name} {a}: fidelity per segment {np.round(np.nanmean(objects['object_fidelity'], 0), 3).tolist()}",
                  flush=True)
        if len(cache) > n_cached:  # after each run: a later failure keeps these rollouts
            np.savez(cache_file, **cache)
            n_cached = len(cache)
    measures = (*SEGMENT_MEASURES, "object_fidelity", "collapse")
    first, second = arms
    with np.errstate(all="ignore"):
        clip_mean = {a: {m: np.nanmean(np.stack(v, axis=2), axis=2) for m, v in per_run[a].items()} for a in arms}
    report = {"runs": [str(r) for r in runs], "arms": arms, "protocol": args.protocol, "clips": args.clips,
              "segment_frames": seg, "checked_against_ablation_eval": checks, "per_segment": {}, "difference": {},
              "extrapolation_difference": {}, "correlation_with_fidelity_difference": {}}
    fid_d = extrapolation_mean(clip_mean[second]["object_fidelity"]) - extrapolation_mean(clip_mean[first]["object_fidelity"])
    for m in measures:
        report["per_segment"][m] = {a: [interval(c) for c in clip_mean[a][m].T] for a in arms}
        if m in truth:
            report["per_segment"][m]["truth"] = [interval(c) for c in truth[m].T]
        d = clip_mean[second][m] - clip_mean[first][m]
        report["difference"][m] = [mean_test(c) for c in d.T]
        e = extrapolation_mean(clip_mean[second][m]) - extrapolation_mean(clip_mean[first][m])
        report["extrapolation_difference"][m] = mean_test(e)
        if m in SEGMENT_MEASURES:
            ok = np.isfinite(e) & np.isfinite(fid_d)
            r = float(np.corrcoef(e[ok], fid_d[ok])[0, 1]) if ok.sum() > 2 and e[ok].std() > 0 and fid_d[ok].std() > 0 \
                else None
            report["correlation_with_fidelity_difference"][m] = {"r": None if r is None else round(r, 3),
                                                                 "n": int(ok.sum())}
    atomic_write_text(args.out, json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(f"{second} - {first}, per clip averaged over {len(runs)} runs, extrapolation mean (segments after the "
          f"first), {args.clips} clips; r = correlation with the fidelity difference over clips:")
    for m in measures:
        corr = report["correlation_with_fidelity_difference"].get(m)
        print(f"  {m:15s} {_fmt(report['extrapolation_difference'][m])}"
              + ("" if not corr or corr["r"] is None else f"   r {corr['r']:+.2f}"))
    return 0


def main(argv=None) -> int:
    return run_main(_main, "bench/pixel_drift.py", argv)


if __name__ == "__main__":
    sys.exit(main())
