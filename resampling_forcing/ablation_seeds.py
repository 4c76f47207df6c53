"""Pool an ablation's training-seed replicates (ablation.py ``--seed N``): each arm against teacher forcing.

    python -m resampling_forcing.ablation_seeds outputs/ablation/cpu outputs/ablation/cpu_seed1 \\
        outputs/ablation/cpu_seed2 [--metrics object_fidelity,motion_score,collapse] [--out pooled.json]

Every folder is one ablation run (report.json and its cached per-clip evaluations in eval/*.npz) on the
SAME evaluation clips with another training seed. For each arm that every folder holds, the per-clip
difference arm - tf of the extrapolation means is taken in each seed, then averaged over the seeds per
clip: the pooled difference is the mean over clips with a 95% t interval and a paired t test over clips
(clips are the independent units; the seeds are averaged within a clip, since the clips and the sampler
noise are shared by all seeds). Holm's adjustment runs over the arms, per metric. Per-seed rows are
printed next to it, so a pooled effect carried by one seed shows.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .ablation_eval import METRICS, extrapolation_mean, holm, paired
from .cli import BadInput, OneLineParser, check_output_file, run_cli

__all__ = ["pool", "main"]

DEFAULT_METRICS = ("object_fidelity", "motion_score", "collapse")
_SAME = ("clips", "frames", "segment_frames", "given_chunks", "sampler", "seed")  # report["eval"] keys


def _arrays(folder: Path, arm: str) -> dict[str, np.ndarray]:
    path = folder / "eval" / f"{arm}.npz"
    if not path.is_file():
        raise BadInput(f"{folder}: no evaluation of arm {arm!r} ({path} is missing); rerun its ablation command")
    with np.load(path) as z:
        return {m: z[m] for m in METRICS if m in z.files}


def pool(folders: Sequence[Path], metrics: Sequence[str] = DEFAULT_METRICS) -> dict:
    """{arms: {arm: {metric: {pooled: {mean, ci95, n, p, p_holm}, seeds: [{mean, ci95, n, p}, ...]}}},
    seeds, folders}. Arms: those every folder evaluated, but tf (the reference) and the warmup."""
    if len(folders) < 1:
        raise BadInput("name at least one ablation folder")
    reports = []
    for f in folders:
        rp = Path(f) / "report.json"
        if not rp.is_file():
            raise BadInput(f"{f}: no report.json; is it an ablation --out folder of a finished run?")
        reports.append(json.loads(rp.read_text()))
    ref = {k: reports[0]["eval"].get(k) for k in _SAME}
    for f, r in zip(folders[1:], reports[1:]):
        diff = [k for k in _SAME if r["eval"].get(k) != ref[k]]
        if diff:
            raise BadInput(f"{f} was evaluated differently from {folders[0]} ({', '.join(diff)}); pool only "
                           "replicates of one ablation (same preset and evaluation, another --seed)")
    seeds = [r["train_seed"] for r in reports]
    if len(set(seeds)) < len(seeds):
        raise BadInput(f"the folders repeat a training seed ({seeds}); pool different --seed runs")
    common = set.intersection(*(set(r["arms"]) for r in reports)) - {"warmup", "tf"}
    if "tf" not in set.intersection(*(set(r["arms"]) for r in reports)):
        raise BadInput("every folder needs the tf arm (the reference of the paired differences)")
    arms = [a for a in reports[0]["arms"] if a in common]  # the first report's order
    out: dict = {a: {} for a in arms}
    tf = [_arrays(Path(f), "tf") for f in folders]
    for arm in arms:
        per = [_arrays(Path(f), arm) for f in folders]
        for m in metrics:
            diffs = np.stack([extrapolation_mean(p[m]) - extrapolation_mean(t[m]) for p, t in zip(per, tf)])
            mean_diff = diffs.mean(axis=0)  # [clips]: a clip missing a value in any seed stays NaN
            out[arm][m] = dict(pooled=paired(mean_diff[:, None], np.zeros_like(mean_diff)[:, None]),
                               seeds=[paired(p[m], t[m]) for p, t in zip(per, tf)])
    for m in metrics:
        adjusted = holm({a: out[a][m]["pooled"]["p"] for a in arms})
        for a in arms:
            out[a][m]["pooled"]["p_holm"] = None if adjusted[a] is None else round(adjusted[a], 6)
    return dict(folders=[str(f) for f in folders], seeds=seeds, clips=ref["clips"], metrics=list(metrics), arms=out)


def table(result: dict) -> str:
    """Markdown: per metric, each arm - tf per seed and pooled (Holm-adjusted p)."""
    def cell(s, holm_p=False):
        if s["mean"] is None:
            return "n/a"
        p = s.get("p_holm") if holm_p else None
        return f"{s['mean']:+.3f} ± {s['ci95']:.3f}" + ("" if p is None else f" (p_Holm {p:.2g})")

    seeds = result["seeds"]
    rows = []
    for m in result["metrics"]:
        rows += [f"**{m}**, arm - tf (extrapolation means, {result['clips']} clips, paired)", "",
                 "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | pooled over seeds |",
                 "|---" * (len(seeds) + 2) + "|"]
        for arm, per in result["arms"].items():
            rows.append(f"| {arm} | " + " | ".join(cell(s) for s in per[m]["seeds"]) + f" | {cell(per[m]['pooled'], True)} |")
        rows.append("")
    return "\n".join(rows)


def build_parser():
    p = OneLineParser(prog="python -m resampling_forcing.ablation_seeds", description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="ablation --out folders of the same preset, one per training seed")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help=f"comma list of {', '.join(METRICS)}")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    return p


def _run(args) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise BadInput(f"--metrics {args.metrics!r}: choose from {', '.join(METRICS)}")
    out = None if args.out is None else check_output_file("--out", args.out, (".json",))
    for f in args.folders:
        if not Path(f).is_dir():
            raise BadInput(f"{f}: not a folder")
    result = pool([Path(f) for f in args.folders], metrics)
    print(table(result))
    if out is not None:
        from .io import atomic_write_json

        atomic_write_json(out, result)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser, _run, argv, prog="ablation_seeds")


if __name__ == "__main__":
    sys.exit(main())
