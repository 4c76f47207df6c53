"""Pool an ablation's training-seed replicates (ablation.py ``--seed N``): each arm against teacher forcing
(or another reference arm).

    python -m resampling_forcing.ablation_seeds outputs/ablation/cpu outputs/ablation/cpu_seed1 \\
        outputs/ablation/cpu_seed2 [--metrics object_fidelity,motion_score,collapse] [--protocol sliding] \\
        [--reference parallel_1step] [--arms ar_1step] [--out pooled.json]

Every folder is one ablation run (report.json and its cached per-clip evaluations in eval/*.npz) of the
same preset, warmup, arms and evaluation clips with another training seed; anything else is refused.
``--protocol`` picks the evaluations pooled (ablation_report.PROTOCOLS: dense, or sliding: a window of the
training clip's history), the same in every folder. ``--reference`` (default tf) is the arm every other
is compared with, e.g. ``parallel_1step`` for autoregressive vs parallel resampling at one strength;
``--arms`` restricts the compared arms (and so the Holm family) to a list. ``--reference-folders`` reads
the reference arm from another set of folders, one per seed in the same order (the same seeds, warmup and
evaluation; the training differs in one setting, e.g. ``--set train.lora.rank=4``): e.g. the LoRA arm
``ar_1step`` against the full fine-tuning ``ar_1step``.
For each arm that every folder holds, d[c, k] = the arm's minus the reference's extrapolation mean on
clip c in seed k. The pooled estimate is the mean of d, and its uncertainty is that of a two-way
random-effects model d = mu + clip_c + seed_k + e: the clip effects are shared by the seeds (same
clips, same sampler noise), the seed effects by all clips, so

    Var(mean) = (MS_clip + max(MS_seed - MS_resid, 0)) / (n K)

with the mean squares of the two-way layout (a negative seed variance estimate is set to 0), a t
interval and a two-sided t test with Satterthwaite's degrees of freedom. So an arm whose gain varies
between seeds is not called significant on the strength of many clips. One seed: the paired t test over
clips. Holm's adjustment runs over the arms, per metric. Per-seed rows are printed next to it.
"""
from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .ablation_eval import METRICS, extrapolation_mean, paired
from .ablation_layout import REPORT_FILE, eval_path
from .stats import holm, interval, sig, t975, t_test, t_two_sided_p
from .cli import BadInput, OneLineParser, add_overwrite, check_output_file, doc_summary, run_cli

__all__ = ["pool", "two_way_mean", "main"]

DEFAULT_METRICS = ("object_fidelity", "motion_score", "collapse")
# report keys every replicate shares ("overrides": the --set list, absent before it was recorded = none)
_SAME = ("steps_per_arm", "warmup", "config", "data_seed", "overrides")
_SAME_EVAL = ("clips", "frames", "segment_frames", "given_chunks", "sampler", "seed")  # report["eval"] keys


def two_way_mean(d: np.ndarray) -> dict:
    """d [clips, seeds] (clips with a NaN in any seed are left out) -> {mean, ci95, n, seeds, df, p,
    sd_seed}: the grand mean with the two-way random-effects standard error of the module docstring."""
    d = d[np.isfinite(d).all(axis=1)]
    n, k = d.shape
    if k == 1 or n < 2:
        out = interval(d[:, 0]) if k == 1 else {"mean": None, "ci95": None, "n": n}
        p = t_test(d[:, 0]) if k == 1 else None
        return {**out, "seeds": k, "df": n - 1 if k == 1 else None, "p": p, "sd_seed": None}
    grand, clip_m, seed_m = d.mean(), d.mean(axis=1), d.mean(axis=0)
    ms_clip = k * float(((clip_m - grand) ** 2).sum()) / (n - 1)
    ms_seed = n * float(((seed_m - grand) ** 2).sum()) / (k - 1)
    ms_res = float(((d - clip_m[:, None] - seed_m[None, :] + grand) ** 2).sum()) / ((n - 1) * (k - 1))
    seed_part = max(ms_seed - ms_res, 0.0)
    var = (ms_clip + seed_part) / (n * k)
    # Satterthwaite: the degrees of freedom of the linear combination of mean squares actually used
    if seed_part > 0:
        df = (ms_clip + ms_seed - ms_res) ** 2 / (ms_clip ** 2 / (n - 1) + ms_seed ** 2 / (k - 1)
                                                  + ms_res ** 2 / ((n - 1) * (k - 1)))
    else:
        df = float(n - 1)
    df = max(df, 1.0)
    se = math.sqrt(var)
    if se <= 1e-12 * max(1.0, abs(float(grand))):
        p = 0.0 if abs(float(grand)) > 1e-12 else 1.0
    else:
        p = t_two_sided_p(float(grand) / se, df)
    return {"mean": round(float(grand), 5), "ci95": round(t975(df) * se, 5), "n": n, "seeds": k,
            "df": round(df, 2), "p": p, "sd_seed": round(math.sqrt(seed_part / n), 5)}


def _arrays(folder: Path, arm: str, clips: int, protocol: str = "dense", routing=None) -> tuple[dict[str, np.ndarray], dict]:
    """An arm's per-clip arrays under `protocol` (its evaluation with inference `routing`, None = dense)
    and its evaluation key (weights left out) from folder/eval/<arm>[_<protocol>].npz."""

    path = eval_path(folder, arm, protocol=protocol)
    if not path.is_file():
        raise BadInput(f"{folder}: no {protocol} evaluation of arm {arm!r} ({path} is missing); rerun its ablation command")
    try:
        with np.load(path) as z:
            arrays = {m: z[m] for m in METRICS if m in z.files}
            key = json.loads(str(z["key"])) if "key" in z.files else None
    except Exception as e:  # noqa: BLE001 - truncated zip, foreign pickle, bad key JSON: a damaged cache file
        raise BadInput(f"{path}: unreadable evaluation ({type(e).__name__}); delete it and rerun its ablation "
                       "command") from None
    if not isinstance(key, dict) or not arrays:
        key = None
    if key is None or key.get("routing") != routing or key.get("split", "eval") != "eval":
        raise BadInput(f"{path} is not a {protocol} evaluation of the eval clips with a cache key; rerun its ablation command")
    key.pop("weights", None)
    if any(a.shape[0] != clips for a in arrays.values()):
        raise BadInput(f"{path} holds {next(iter(arrays.values())).shape[0]} clips, its report {clips}; "
                       "rerun its ablation command")
    return arrays, key


def _read_report(folder: Path) -> dict:
    """folder/report.json with the shape pool() reads (a damaged or foreign file: BadInput, one line)."""
    rp = folder / REPORT_FILE
    if not rp.is_file():
        raise BadInput(f"{folder}: no {REPORT_FILE}; is it an ablation --out folder of a finished run?")
    try:
        report = json.loads(rp.read_text(encoding="utf-8"))
        problem = _report_problem(report)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem:
        raise BadInput(f"{rp}: not a readable ablation report ({problem}); rerun its ablation command")
    return report


def _report_problem(r) -> str | None:
    """What a report lacks of the shape pool() reads, or None."""
    if not isinstance(r, dict):
        return f"a JSON {type(r).__name__}, not an object"
    missing = [k for k in ("train_seed", "eval", "arms") if k not in r]
    if missing:
        return f"no {', '.join(missing)}"
    ev = r["eval"]
    if isinstance(r["train_seed"], bool) or not isinstance(r["train_seed"], int):
        return f"train_seed {r['train_seed']!r} is not an int"
    if not isinstance(ev, dict) or isinstance(ev.get("clips"), bool) or not isinstance(ev.get("clips"), int):
        return "eval.clips is not a count"
    if not isinstance(ev.get("clip_sets", {}), dict) or not isinstance(ev.get("clip_sets", {}).get("seeds", {}), dict):
        return "eval.clip_sets is not an object"
    protocols = r.get("protocols", {})
    if not isinstance(protocols, dict) or not all(isinstance(e, dict) and "routing" in e for e in protocols.values()):
        return "protocols is not an object of {routing, arms} entries"
    for name, arms in [("arms", r["arms"]), *((f"protocols.{p}.arms", e.get("arms")) for p, e in protocols.items())]:
        if not isinstance(arms, dict) or not all(isinstance(a, dict) for a in arms.values()):
            return f"{name} is not an object of arm entries"
    return None


def _weights_digest(folder: str) -> Optional[str]:
    """sha256 over a warmup's weight files and their model configs (names and bytes); None when it is not
    there (any more). Hashed once per folder and state of its files (a comparison reads gigabytes at 1.3B)."""
    f = Path(folder).resolve()
    files = sorted([*f.rglob("*.safetensors"), *f.rglob("model_config.json")]) if f.is_dir() else []
    if not files:
        return None
    return _digest(str(f), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@functools.lru_cache(maxsize=None)
def _digest(folder: str, files: tuple) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, _, _ in files:
        p = Path(name)
        h.update(str(p.relative_to(folder)).encode())
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _differences(first: dict, r: dict, keys: Sequence[str]) -> list[str]:
    """The report keys (and evaluation settings) in which report `r` differs from `first`."""
    def same(k: str, a, b) -> bool:  # the warmup as a file: two paths to it, or to two copies of it, agree
        if k == "overrides":
            a, b = a or [], b or []
        if a == b:
            return True
        if k != "warmup" or not isinstance(a, str) or not isinstance(b, str):
            return False
        if Path(a).resolve() == Path(b).resolve():
            return True
        da, db = _weights_digest(a), _weights_digest(b)  # two copies of the same weights (another checkout)
        return da is not None and da == db

    diff = [k for k in keys if not same(k, r.get(k), first.get(k))]
    diff += [f"eval.{k}" for k in _SAME_EVAL if r["eval"].get(k) != first["eval"].get(k)]
    seeds_a = first["eval"].get("clip_sets", {}).get("seeds", {}).get("eval")
    seeds_b = r["eval"].get("clip_sets", {}).get("seeds", {}).get("eval")
    if seeds_a is not None and seeds_b is not None and seeds_a != seeds_b:
        diff.append("the evaluation clips")
    return diff


def _check_reference_folders(folders: Sequence[Path], reports: list[dict], refs: Sequence[Path],
                             ref_reports: list[dict]) -> None:
    """BadInput unless `refs` pair with `folders` seed by seed: the same training seed, warmup and
    evaluation (their training may differ, its length included: that is the comparison)."""
    if len(refs) != len(folders):
        raise BadInput(f"--reference-folders names {len(refs)} folders for {len(folders)}; one per folder, same order")
    for f, r, g, q in zip(folders, reports, refs, ref_reports):
        diff = _differences(r, q, ("train_seed", "warmup", "data_seed"))
        if diff:
            raise BadInput(f"{g} differs from {f} in {', '.join(diff)}; pair each folder with one of the same seed, "
                           "warmup and evaluation")


def _check_replicates(folders: Sequence[Path], reports: list[dict]) -> None:
    """BadInput unless the folders are replicates of one ablation (another training seed each)."""
    for f, r in zip(folders[1:], reports[1:]):
        diff = _differences(reports[0], r, _SAME)
        if diff:
            raise BadInput(f"{f} differs from {folders[0]} in {', '.join(diff)}; pool only replicates of one "
                           "ablation (same preset, warmup and evaluation, another --seed)")
    seeds = [r["train_seed"] for r in reports]
    if len(set(seeds)) < len(seeds):
        raise BadInput(f"the folders repeat a training seed ({seeds}); pool different --seed runs")


def _protocol_arms(folder, report: dict, protocol: str) -> tuple[dict, list | None]:
    """(the report's arm entries under `protocol`, its routing: None for dense)."""
    if protocol == "dense":
        return report["arms"], None
    entry = report.get("protocols", {}).get(protocol)
    if entry is None:
        raise BadInput(f"{folder}: its report has no {protocol} evaluation; rerun its ablation command with "
                       f"--protocols dense,{protocol}")
    return entry["arms"], entry["routing"]


def pool(folders: Sequence[Path], metrics: Sequence[str] = DEFAULT_METRICS, protocol: str = "dense",
         reference: str = "tf", arms: Sequence[str] | None = None,
         reference_folders: Sequence[Path] | None = None) -> dict:
    """{arms: {arm: {metric: {pooled: two_way_mean + p_holm, seeds: [paired per seed]}}}, seeds, folders},
    each arm minus `reference`, of the evaluations under `protocol` (ablation_report.PROTOCOLS). Arms:
    `arms` (every folder must hold them), or else those every folder evaluated but the reference and the
    warmup. `reference_folders`: read the reference from these instead (one per folder, same seeds)."""
    if len(folders) < 1:
        raise BadInput("name at least one ablation folder")
    reports = [_read_report(Path(f)) for f in folders]
    _check_replicates(folders, reports)
    refs = [Path(f) for f in reference_folders] if reference_folders else None
    if refs is not None:
        _check_reference_folders(folders, reports, refs, [_read_report(g) for g in refs])
    entries = [_protocol_arms(f, r, protocol) for f, r in zip(folders, reports)]
    routings = [rt for _, rt in entries]
    if any(rt != routings[0] for rt in routings):
        raise BadInput(f"the folders' {protocol} evaluations used different routings ({routings}); not replicates")
    held = [set(a) for a, _ in entries]
    ref_held = held if refs is None else [set(_protocol_arms(g, _read_report(g), protocol)[0]) for g in refs]
    lacking = [str(f) for f, h in zip(refs or folders, ref_held) if reference not in h]
    if lacking:
        raise BadInput(f"{', '.join(lacking)}: no {reference} arm (the reference of the paired differences); "
                       "pass --reference with an arm every folder holds")
    common = set.intersection(*held) - {"warmup"} - ({reference} if refs is None else set())
    if arms is None:
        arms = [a for a in entries[0][0] if a in common]  # the first report's order
    elif reference in arms and refs is None:
        raise BadInput(f"--arms names the reference {reference}; list the arms compared with it")
    elif len(set(arms)) < len(arms):
        raise BadInput(f"--arms {','.join(arms)} names an arm twice")
    else:
        missing = [a for a in arms if a not in common]
        if missing or not arms:
            raise BadInput(f"--arms: {', '.join(missing) or 'none given'} not in every folder (other than the "
                           f"reference {reference}); choose from {', '.join(sorted(common))}")
    clips = reports[0]["eval"]["clips"]
    def load(arm: str, where: Sequence[Path], where_reports: list[dict]) -> tuple[list[dict], dict]:
        per = [_arrays(Path(f), arm, clips, protocol, routings[0]) for f in where]
        for f, r, (_, key) in zip(where[1:], where_reports[1:], per[1:]):
            if key != per[0][1]:
                raise BadInput(f"{f}: arm {arm!r} was evaluated differently from {where[0]} ({key} vs {per[0][1]})")
            if r["arms"][arm].get("overrides") != where_reports[0]["arms"][arm].get("overrides"):
                raise BadInput(f"{f}: arm {arm!r} was trained with {r['arms'][arm].get('overrides')}, in "
                               f"{where[0]} with {where_reports[0]['arms'][arm].get('overrides')}; not replicates")
        return [a for a, _ in per], per[0][1]

    ref_arrays, ref_key = load(reference, refs or folders, reports if refs is None else
                               [_read_report(g) for g in refs])
    loaded = {}
    for arm in arms:
        loaded[arm], key = load(arm, folders, reports)
        if key != ref_key:
            raise BadInput(f"arm {arm!r} was evaluated differently from the reference ({key} vs {ref_key})")
    out: dict = {a: {} for a in arms}
    for arm in arms:
        for m in metrics:
            d = np.stack([extrapolation_mean(p[m]) - extrapolation_mean(t[m])
                          for p, t in zip(loaded[arm], ref_arrays)], axis=1)  # [clips, seeds]
            out[arm][m] = dict(pooled=two_way_mean(d), seeds=[paired(p[m], t[m]) for p, t in zip(loaded[arm], ref_arrays)])
    for m in metrics:
        adjusted = holm({a: out[a][m]["pooled"]["p"] for a in arms})
        for a in arms:
            pooled = out[a][m]["pooled"]
            pooled["p"], pooled["p_holm"] = sig(pooled["p"]), sig(adjusted[a])
            for s in out[a][m]["seeds"]:
                s["p"] = sig(s["p"])
    return dict(folders=[str(f) for f in folders], seeds=[r["train_seed"] for r in reports], clips=clips,
                protocol=protocol, routing=routings[0], reference=reference, metrics=list(metrics), arms=out,
                reference_folders=[str(g) for g in refs] if refs is not None else None,
                pooled="mean over clips and seeds; ci95 and p from a two-way (clip x seed) random-effects model, "
                       "Satterthwaite df; p_holm over the arms, per metric")


def table(result: dict) -> str:
    """Markdown: per metric, each arm - the reference per seed and pooled (Holm-adjusted p)."""
    def cell(s, holm_p=False):
        if s["mean"] is None:
            return "n/a"
        p = s.get("p_holm") if holm_p else None
        return f"{s['mean']:+.3f} ± {s['ci95']:.3f}" + ("" if p is None else f" (p_Holm {p:.2g})")

    seeds, ref = result["seeds"], result.get("reference", "tf")
    if result.get("reference_folders"):
        ref += " of the reference folders"
    rows = []
    for m in result["metrics"]:
        where = "" if result.get("protocol", "dense") == "dense" else f", {result['protocol']} attention"
        rows += [f"**{m}**, arm - {ref} (extrapolation means, {result['clips']} clips, paired{where})", "",
                 "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | pooled over seeds |",
                 "|---" * (len(seeds) + 2) + "|"]
        for arm, per in result["arms"].items():
            rows.append(f"| {arm} | " + " | ".join(cell(s) for s in per[m]["seeds"]) + f" | {cell(per[m]['pooled'], True)} |")
        rows.append("")
    return "\n".join(rows)


def build_parser():
    p = OneLineParser(prog="python -m resampling_forcing.ablation_seeds", description=doc_summary(__doc__))
    p.add_argument("folders", nargs="+", help="ablation --out folders of the same preset, one per training seed")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help=f"comma list of {', '.join(METRICS)}")
    p.add_argument("--protocol", default="dense", help="the evaluations to pool: dense or sliding (ablation --protocols; default dense)")
    p.add_argument("--reference", default="tf", help="the arm the others are compared with (default tf)")
    p.add_argument("--arms", default=None, help="comma list of the arms compared with it (default: every arm "
                   "all folders hold); the Holm adjustment runs over these")
    p.add_argument("--reference-folders", default=None, help="comma list: read the reference arm from these "
                   "folders, one per folder in the same order (same seeds; another training setting)")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    add_overwrite(p)
    return p


def _run(args) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise BadInput(f"--metrics {args.metrics!r}: choose from {', '.join(METRICS)}")
    out = None if args.out is None else check_output_file("--out", args.out, (".json",), args.overwrite)
    for f in args.folders:
        if not Path(f).is_dir():
            raise BadInput(f"{f}: not a folder")
    from .ablation_report import PROTOCOLS

    if args.protocol not in PROTOCOLS:
        raise BadInput(f"--protocol {args.protocol!r}: choose from {', '.join(PROTOCOLS)}")
    arms = None if args.arms is None else [a.strip() for a in args.arms.split(",") if a.strip()]
    refs = None if args.reference_folders is None else [f.strip() for f in args.reference_folders.split(",") if f.strip()]
    for f in refs or []:
        if not Path(f).is_dir():
            raise BadInput(f"--reference-folders: {f} is not a folder")
    result = pool([Path(f) for f in args.folders], metrics, args.protocol, args.reference.strip(), arms, refs)
    print(table(result))
    if out is not None:
        from .io import atomic_write_json

        atomic_write_json(out, result)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser, _run, argv, prog="ablation_seeds")


if __name__ == "__main__":
    sys.exit(main())
