"""A controlled ablation of the history degradation, as one resumable command.

    python -m resampling_forcing.ablation --preset cpu [--arms tf,ar_rec] [--steps 300] [--out DIR]

1. Warmup: ONE teacher-forcing checkpoint every arm starts from: the preset's shipped asset
   (``assets/ablation/warmup``: ``model.safetensors``, ``model_config.json`` and ``config.yaml`` of the
   final checkpoint of ``python train/train.py --config configs/ablation_cpu.yaml``), ``--warmup PATH``,
   or trained here into OUT/warmup.
2. Calibration: the exposure-gap diagnostic (diagnose.py) of the warmup on the held-out CALIBRATION
   clips gives the rollout error a history has at inference (target), the resampling shift s whose
   degradation error meets it (``recommend_shift``) and the noise level sigma = sqrt(target) with the same
   error.
3. Arms: each trains ``steps`` more steps from the warmup with the SAME learning-rate schedule
   (linear warm-up, cosine to lr * min_lr_ratio), batch, data order and seed; only the history
   degradation differs (ablation_arms.ARMS). Training runs in this process through training.train (its own
   checkpoints: a rerun resumes an arm where it stopped).
4. Evaluation (ablation_eval.py): the held-out EVAL clips continued from their first chunk to 8x the
   training clip, scored per segment against the truth (paired differences against tf with t intervals,
   p-values and Holm's adjustment over the arms, per metric), under each protocol of ``--protocols``
   (ablation_report.py: dense attention, and a sliding window of the training clip's history that
   measures error accumulation without the given chunk as an anchor); each arm's exposure gap (calibration
   clips); then the best arm but tf, chosen on the held-out VALIDATION clips (highest extrapolation
   object fidelity), under inference routing: dense, top-1, top-5, window 1, sink 1 + window 4. The three
   clip sets are disjoint (data.synthetic.HELD_OUT_SEED_BASES): nothing that tunes the experiment sees
   the clips that report it.
5. Report: OUT/report.json (+ ``--report-dir``: ``<preset>.json``, one PNG per metric over segments,
   one contact sheet per arm). Every stage's result is a file in OUT, stored with what it was made from
   (weights, settings); a rerun reuses what still matches and redoes the rest.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .ablation_arms import (ARMS, DEFAULT_ARMS, arm_overrides, arm_settings, check_arm_sets, describe_arm,
                            seed_overrides)
from .ablation_layout import REPORT_FILE, arm_dir, eval_path, sheet_path
from .cli import EXIT_BAD_INPUT, BadInput, OneLineParser, check_checkpoint, check_output_dir, check_seed, doc_summary
from .config_checks import check_cfg_scale

__all__ = ["Preset", "PRESETS", "run", "main"]

_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Preset:
    config: str  # the world, the model and the warmup's training (a train/train.py config)
    warmup_asset: Optional[str]  # shipped warmup checkpoint (used when present); None: train it
    steps: int = 300  # per arm, after the warmup
    lr: float = 3e-4
    lr_warmup: int = 20
    min_lr_ratio: float = 0.1
    eval_clips: int = 32
    eval_segments: int = 8  # continuation length in training clips
    given_chunks: int = 1
    gap_clips: int = 16  # calibration and exposure gaps (the calibration clips)
    val_clips: int = 16  # the choice of the best arm (the validation clips)
    shifts: Optional[str] = None  # the calibration's shift sweep (None: diagnose.DEFAULT_SHIFTS)
    sample_seed: int = 0


PRESETS = {
    "cpu": Preset("configs/ablation_cpu.yaml", "assets/ablation/warmup"),
    # prepared for a lent accelerator: a larger world (64x64, up to 4 objects) and model (configs/ablation_gpu.yaml)
    "gpu": Preset("configs/ablation_gpu.yaml", None, steps=3000, lr=2e-4, lr_warmup=100, eval_clips=128,
                  gap_clips=64, val_clips=64),
}

ROUTINGS = {  # inference routing of the best arm (RoutingSpec arguments)
    "dense": None,
    "top-1": ("topk", 1, 0, 0),
    "top-5": ("topk", 5, 0, 0),
    "window 1": ("window", None, 0, 1),
    "sink 1 + window 4": ("window", None, 1, 4),
}


class Interrupted(Exception):
    """An arm's training was stopped by a signal (its checkpoint is saved; rerun to resume)."""


def _path(p: str) -> Path:
    """A preset path: as given when it exists (relative to the working folder), else in the checkout."""
    q = Path(p)
    return q if q.exists() or q.is_absolute() else _ROOT / q


def _train(config: Path, overrides: list[str]) -> Path:
    """training.train in this process (resumes from the run's own checkpoints) -> the run dir."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from .config import load_config
    from .training import train

    from .config import ConfigError
    from .data.loader import DataError
    from .encoders import EncoderLoadError
    from .models.loading import CheckpointError

    cfg = load_config(config, overrides)
    try:
        result = train(cfg)
    except (ConfigError, DataError, EncoderLoadError, CheckpointError) as e:  # what train.py reports in one line
        raise BadInput(f"training {cfg.train.run_dir}: {str(e).strip().splitlines()[0]}") from None
    finally:  # the next arm gets a fresh Accelerator
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    if result["status"] != "completed":
        raise Interrupted(f"{cfg.train.run_dir} stopped at step {result['step']} by {result.get('signal')}")
    return Path(cfg.train.run_dir)


# settings that may differ between a reused run and this invocation (logging, not what is trained)
_REUSE_IGNORES = ("train.progress", "train.tensorboard", "train.log_every")


def _same(a, b) -> bool:
    """Two config values are the same setting (paths compared resolved: a relative and an absolute --out)."""
    if a == b:
        return True
    return isinstance(a, str) and isinstance(b, str) and ("/" in a or "/" in b) and Path(a).resolve() == Path(b).resolve()


def _finished(run_dir: Path, steps: int, config: Path, overrides: list[str]) -> bool:
    """Whether `run_dir` holds a run trained to `steps` or more with the settings `config` + `overrides` give.
    A run there (finished or stopped early) with other settings (another --seed, --steps, --warmup or --set
    in the same --out) is refused (BadInput): reusing or resuming it would mix two experiments."""
    import yaml

    from .checkpoint import checkpoint_root, config_file, latest_checkpoint, step_of
    from .config import config_from_dict, load_config, to_dict
    from .training_utils import flatten, resolve_grad_accum

    ck = latest_checkpoint(run_dir) if checkpoint_root(run_dir).is_dir() else None
    if ck is None:
        return False
    want = load_config(config, overrides)
    resolve_grad_accum(want, 1)  # as the trainer saved it (the runner trains in one process)
    if config_file(ck).is_file():
        old = flatten(to_dict(config_from_dict(yaml.safe_load(config_file(ck).read_text()))))
        new = flatten(to_dict(want))
        changes = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                   if not k.startswith(_REUSE_IGNORES) and not _same(old.get(k), new.get(k))]
        if changes:
            raise BadInput(f"{run_dir} was trained with other settings ({'; '.join(changes[:3])}); pass another "
                           "--out (or delete that run to retrain it)")
    return step_of(ck) >= steps


def _diagnose(checkpoint: Path, out: Path, clips: int, shifts: str, extra: Sequence[str] = ()) -> dict:
    """diagnose.py on the calibration clips -> its report, cached in `out` with a key file beside it (the
    checkpoint's weight files and the arguments): a retrained arm or another --gap-clips is measured again."""
    from .ablation_eval import cache_key
    from .diagnose import main as diagnose

    args = ["--clips", str(clips), "--shifts", shifts, "--held-out", "calibration", "--device", "cpu", *extra]
    key, key_file = cache_key(checkpoint, diagnose=args), out.with_suffix(".key")
    if not (out.is_file() and key_file.is_file() and key_file.read_text() == key):
        code = diagnose(["--checkpoint", str(checkpoint), "--out", str(out), "--overwrite", *args])
        if code != 0:
            raise RuntimeError(f"diagnose of {checkpoint} failed (exit {code})")
        key_file.write_text(key)
    return json.loads(out.read_text())


def calibrate(warmup: Path, out: Path, preset: Preset, clips: int) -> dict:
    """The warmup's exposure gap on the calibration clips -> target error, the rollout-matched s (`recommended_shift`,
    the arms' "rec" strength: diagnose's upper bound), the one-step-matched s, noise sigma."""
    diag = _diagnose(warmup, out / "calibration" / "diagnose_warmup.json", clips, preset.shifts,
                     ["--objective", "resampling"])
    from .diagnose import recommend_shift

    target, one_step = diag["report"]["rollout_mean"], diag["report"]["one_step_mean"]
    sweep = {p["shift"]: p["degradation"] for p in diag["sweep"]["shifts"] if p["degradation"] is not None}
    rec, rec_one = recommend_shift(sweep, target), recommend_shift(sweep, one_step)  # the arms' two strengths
    return dict(target=target, recommended_shift=float(rec), reached=rec.reached, rule=rec.rule,
                one_step_target=one_step, one_step_shift=float(rec_one), one_step_reached=rec_one.reached,
                noise_sigma=math.sqrt(target), sweep=diag["sweep"], report=diag["report"])


def _arm_gap(name: str, run_dir: Path, out: Path, clips: int) -> dict:
    from .checkpoint import config_file
    from .config import load_config

    cfg = load_config(config_file(run_dir))
    stage = cfg.train.stages[-1]
    extra = ["--objective", stage.objective, "--noise-scale", str(stage.noise_aug_scale),
             "--shift", str(cfg.diffusion.resample_shift)]
    d = _diagnose(run_dir, out / f"gap_{name}.json", clips, str(cfg.diffusion.resample_shift), extra)
    return {k: d["report"][k] for k in ("degradation_mean", "one_step_mean", "rollout_mean", "ratio")}


def _evaluate(name: str, checkpoint: Path, clips, preset: Preset, seg: int, out: Path, routing=None,
              split: str = "eval", protocol: str = "dense") -> dict:
    """Continue `clips` (held-out set `split`) with a checkpoint under inference `routing` (the protocol
    `protocol`'s, or a routing of the best arm) -> {summary, per-clip arrays} (cached at
    ablation_layout.eval_path; a contact sheet in OUT/sheets for the eval set)."""
    from .ablation_eval import cache_key, cached, continue_clips, contact_sheet, metric_arrays, score, summarize
    from .attention.routing import RoutingSpec
    from .pipeline import Pipeline

    path = eval_path(out, name, split, protocol)
    key = cache_key(checkpoint, clips=len(clips), given=preset.given_chunks, seed=preset.sample_seed, seg=seg,
                    routing=routing, split=split)
    if not cached(path, key):
        t0 = time.perf_counter()
        pipe = Pipeline.from_pretrained(checkpoint, device="cpu")
        spec = RoutingSpec(*routing) if routing else None
        videos = continue_clips(pipe, clips, preset.given_chunks, routing=spec if routing else "dense",
                                seed=preset.sample_seed)
        arrays = metric_arrays(score(videos, clips, seg))
        if split == "eval":
            contact_sheet(videos, np.stack([v for v, _ in clips]), seg, sheet_path(out, path.stem))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, seconds=time.perf_counter() - t0, key=key, **arrays)
        tmp.replace(path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k not in ("seconds", "key")}
        seconds = float(z["seconds"])
    return dict(arrays=arrays, summary=summarize(arrays), seconds=round(seconds, 1))


def run(args) -> int:
    from .ablation_eval import METRICS, eval_clips, extrapolation_mean, plot_metric, sanity_check
    from .stats import interval
    from .ablation_report import PROTOCOLS, eval_entry, parse_protocols, protocol_routing, table, with_holm
    from .data.synthetic import HELD_OUT_SEED_BASES
    from .config import ConfigError, load_config, synthetic_seed
    from .diagnose import DEFAULT_SHIFTS
    from .io import atomic_write_json

    if args.preset not in PRESETS:
        raise BadInput(f"--preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    preset = PRESETS[args.preset]
    preset = dataclasses.replace(preset, shifts=preset.shifts or DEFAULT_SHIFTS)  # as the report records it
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms is not None else list(DEFAULT_ARMS)
    for a in arms:
        describe_arm(a)
    if len(set(arms)) < len(arms):
        raise BadInput(f"--arms {args.arms!r} names an arm twice")
    if not arms:
        raise BadInput(f"--arms {args.arms!r} names no arm; choose from {', '.join(ARMS)}")
    steps = preset.steps if args.steps is None else args.steps
    if steps < 1:
        raise BadInput(f"--steps must be >= 1 (got {steps})")
    if args.resample_steps < 1:
        raise BadInput(f"--resample-steps must be >= 1 (got {args.resample_steps})")
    try:
        check_cfg_scale(args.resample_cfg, "--resample-cfg", "1 = no guidance while resampling (the default)")
    except ValueError as e:
        raise BadInput(str(e)) from None
    # every flag is checked here, before hours of training (they were read only when first used)
    check_seed("--seed", args.seed)
    check_arm_sets(args.overrides)
    try:
        protocols = parse_protocols(args.protocols)
    except ValueError as e:
        raise BadInput(str(e)) from None
    if args.routing_arm is not None and args.no_routing:
        raise BadInput("--routing-arm and --no-routing contradict each other; drop one")
    if args.routing_arm is not None and args.routing_arm not in arms:
        raise BadInput(f"--routing-arm {args.routing_arm!r} is not among the arms ({', '.join(arms)})")
    if args.warmup is not None and not Path(args.warmup).is_dir():
        raise BadInput(f"--warmup {args.warmup}: not a run or checkpoint folder")
    if args.warmup:  # read first by the calibration, after the work folder is made: checked now
        check_checkpoint("--warmup", args.warmup)
    default_out = f"outputs/ablation/{args.preset}" + ("" if args.seed is None else f"_seed{args.seed}")
    out = check_output_dir("--out", default_out if args.out is None else args.out)
    if (out / "diagnose_warmup.json").is_file() or (out / "gaps").is_dir():
        raise BadInput(f"--out {out} was made by an earlier version that calibrated on the evaluation clips; "
                       "pass a new --out (its arms would be refused or mixed with recalibrated ones)")
    if args.report_dir is not None:
        check_output_dir("--report-dir", args.report_dir)
    config = _path(args.config or preset.config)
    try:
        base = load_config(config, args.overrides)
    except ConfigError as e:
        raise BadInput(str(e).splitlines()[0]) from None
    out.mkdir(parents=True, exist_ok=True)
    data_seed = synthetic_seed(base)
    seed_sets = seed_overrides(args.seed, base)
    t_start, t_wall = time.perf_counter(), time.time()
    clips_n = args.eval_clips or preset.eval_clips
    gap_n = args.gap_clips or preset.gap_clips
    seg = base.data.num_frames
    print(f"[ablation] preset {args.preset}: arms {', '.join(arms)}, {steps} steps each, {clips_n} eval clips "
          f"of {preset.eval_segments} x {seg} frames; work folder {out}", flush=True)

    # 1. the shared warmup
    if args.warmup:
        warmup = Path(args.warmup)
    elif preset.warmup_asset and _path(preset.warmup_asset).is_dir() and not args.train_warmup:
        warmup = _path(preset.warmup_asset)
    else:
        warm_steps = sum(s.steps for s in base.train.stages)
        warmup = out / "warmup"
        warm_sets = list(args.overrides) + [f"train.run_dir={warmup}", "train.tensorboard=false"]
        if not _finished(warmup, warm_steps, config, warm_sets):
            print(f"[ablation] training the teacher-forcing warmup ({warm_steps} steps) into {warmup}", flush=True)
            _train(config, warm_sets)
    if not warmup.exists():
        raise BadInput(f"warmup {warmup} does not exist; pass --warmup RUN_OR_CHECKPOINT or --train-warmup")
    print(f"[ablation] warmup: {warmup}", flush=True)

    # 2. calibration
    calib = calibrate(warmup, out, preset, gap_n)
    print(f"[ablation] calibration: rollout error {calib['target']:.4g}, rollout-matched s {calib['recommended_shift']:.3g} "
          f"({'reached' if calib['reached'] else 'NOT reached'}), noise sigma {calib['noise_sigma']:.3g}", flush=True)

    # 3. evaluation clips, the metrics' sanity check and the warmup's own evaluation (before the arms:
    # its time tells how long each arm's evaluation takes)
    clips = eval_clips(base.data, clips_n, seg * preset.eval_segments, data_seed)
    print(f"[ablation] sanity check of the metrics on {len(clips)} true clips", flush=True)
    sanity_path = out / f"sanity_{len(clips)}x{seg * preset.eval_segments}.json"  # keyed by the clips it checks
    if not sanity_path.is_file():  # given frames = latent frames: the ablation worlds use PixelShuffleVAE (1:1 in time)
        atomic_write_json(sanity_path, sanity_check(clips, preset.given_chunks * base.model.chunk_frames, seg))
    sanity = json.loads(sanity_path.read_text())
    results = {"warmup": _evaluate("warmup", warmup, clips, preset, seg, out)}
    results["warmup"]["gap"] = None
    print(f"[ablation] warmup evaluated ({results['warmup']['seconds']:.0f} s per evaluation)", flush=True)

    # 4. arms
    arm_dirs = {}
    for i, name in enumerate(arms):
        run_dir = arm_dir(out, name)
        arm_dirs[name] = run_dir
        arm_sets = arm_settings(arm_overrides(name, calib, preset, steps, warmup, run_dir, args.resample_steps,
                                               args.resample_cfg),
                                args.overrides, seed_sets)
        if _finished(run_dir, steps, config, arm_sets):
            continue
        print(f"[ablation] arm {i + 1}/{len(arms)} {name}: {describe_arm(name)}", flush=True)
        _train(config, arm_sets)

    # 5. evaluation of the arms
    for name in arms:
        print(f"[ablation] evaluating {name}", flush=True)
        results[name] = _evaluate(name, arm_dirs[name], clips, preset, seg, out)
        results[name]["gap"] = _arm_gap(name, arm_dirs[name], out / "calibration", gap_n)
    # ... and under the further protocols (ablation_report.PROTOCOLS), the warmup included
    by_protocol = {}
    for proto in protocols[1:]:
        spec = protocol_routing(proto, base)
        by_protocol[proto] = (spec, {})
        for name in ["warmup"] + arms:
            print(f"[ablation] evaluating {name} under {proto} attention", flush=True)
            by_protocol[proto][1][name] = _evaluate(name, warmup if name == "warmup" else arm_dirs[name], clips,
                                                    preset, seg, out, routing=spec, protocol=proto)

    # the best arm, chosen on the validation clips (the eval clips only report it); only when it is used
    val_n = args.val_clips or preset.val_clips
    candidates = [a for a in arms if a != "tf"] or arms
    best, validation, val_seeds = None, {}, []
    if not args.no_routing and args.routing_arm is None:
        val = eval_clips(base.data, val_n, seg * preset.eval_segments, data_seed, split="validation")
        val_seeds = [int(m["seed"]) for _, m in val]
        for name in candidates:
            print(f"[ablation] validating {name} ({len(val)} validation clips)", flush=True)
            r = _evaluate(name, arm_dirs[name], val, preset, seg, out, split="validation")["arrays"]
            validation[name] = {m: interval(extrapolation_mean(r[m])) for m in ("object_fidelity", "psnr")}
        best = max(candidates, key=lambda a: (validation[a]["object_fidelity"]["mean"], validation[a]["psnr"]["mean"]))
    routed = args.routing_arm or best
    routing = {}
    if not args.no_routing:
        for rname, spec in ROUTINGS.items():
            if spec is None and base.attention.routing.mode == "dense":  # = the arm's own evaluation
                routing[rname] = results[routed]
                continue
            print(f"[ablation] routing of {routed}: {rname}", flush=True)
            routing[rname] = _evaluate(f"{routed} {rname}", arm_dirs[routed], clips, preset, seg, out, routing=spec)

    # 6. report
    def arm_entry(name):
        r = results[name]
        d = eval_entry(r, results.get("tf") if name not in ("tf", "warmup") else None)  # warmup: no arm of the Holm family
        d["gap"] = r["gap"]
        if name in validation:
            d["validation"] = validation[name]
        if name != "warmup":
            d["description"] = describe_arm(name)
            d["overrides"] = arm_overrides(name, calib, preset, steps, warmup, arm_dirs[name], args.resample_steps,
                                           args.resample_cfg)[2:4]
        return d

    def protocol_entry(proto):
        spec, res = by_protocol[proto]
        return dict(description=PROTOCOLS[proto], routing=list(spec), arms=with_holm(
            {n: eval_entry(r, res.get("tf") if n not in ("tf", "warmup") else None) for n, r in res.items()}, "vs_tf"))

    report = dict(
        command=" ".join(["python -m resampling_forcing.ablation"] + (args.argv or [])),
        preset=dataclasses.asdict(preset), config=str(config), overrides=list(args.overrides), warmup=str(warmup),
        steps_per_arm=steps,
        train_seed=base.train.seed if args.seed is None else args.seed, data_seed=data_seed,
        eval=dict(clips=len(clips), frames=seg * preset.eval_segments, segment_frames=seg,
                  given_chunks=preset.given_chunks, sampler=dict(steps=base.diffusion.sample_steps,
                  shift=base.diffusion.sample_shift, cfg=base.diffusion.cfg_scale), seed=preset.sample_seed,
                  collapse="object_fidelity < 0.5 or background_clean < 0.5 in a segment",
                  interval="mean +- t975(n-1) sd / sqrt(n) over clips; vs_tf: paired over the same clips",
                  p="vs_tf / vs_dense p: two-sided paired t test over clips; p_holm: Holm's adjustment over "
                    "the arms compared with tf (the routings compared with dense), per metric",
                  clip_sets=dict(seeds=dict(eval=[int(m["seed"]) for _, m in clips],
                                            calibration=[HELD_OUT_SEED_BASES["calibration"] + i for i in range(gap_n)],
                                            validation=val_seeds)),
                  extrapolation="per clip mean over segments 1.. (beyond the training length)"),
        calibration=calib, sanity=sanity, arms=with_holm({n: arm_entry(n) for n in ["warmup"] + arms}, "vs_tf"),
        best_arm=best, best_by=("extrapolation object_fidelity (then psnr) on the validation clips" if best else
                                "not chosen (--no-routing or --routing-arm)"), routing_arm=routed,
        routing=with_holm({k: eval_entry(v, None if k == "dense" else routing["dense"], "vs_dense")
                           for k, v in routing.items()}, "vs_dense"),
        protocols={p: protocol_entry(p) for p in protocols[1:]},
        wall_seconds_this_run=round(time.perf_counter() - t_start, 1))
    # every invocation that built this folder (a resumed run is several): command and wall time each
    this = dict(command=report["command"], started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_wall)),
                wall_seconds=report["wall_seconds_this_run"])
    log = out / "invocations.jsonl"
    report["invocations"] = [json.loads(l) for l in log.read_text().splitlines() if l.strip()] if log.is_file() else []
    report["invocations"].append(this)
    atomic_write_json(out / REPORT_FILE, report)
    with open(log, "a") as f:
        f.write(json.dumps(this) + "\n")
    summaries = {n: results[n]["summary"] for n in ["warmup"] + arms}
    for m in METRICS:
        plot_metric(summaries, m, seg, out / "plots" / f"{m}.png", title=f"{m}: continuing held-out clips")
        if routing:
            plot_metric({k: v["summary"] for k, v in routing.items()}, m, seg, out / "plots" / f"routing_{m}.png",
                        title=f"{m}: {routed} under inference routing")
        for proto, (_, res) in by_protocol.items():
            plot_metric({n: r["summary"] for n, r in res.items()}, m, seg, out / "plots" / f"{proto}_{m}.png",
                        title=f"{m}: continuing held-out clips, {proto} attention")
    print(table(report), flush=True)
    if args.report_dir:
        rd = Path(args.report_dir)
        rd.mkdir(parents=True, exist_ok=True)
        atomic_write_json(rd / f"{args.preset}.json", report)
        for sub in ("plots", "sheets"):
            for f in sorted((out / sub).glob("*.png")):
                (rd / f"{args.preset}_{sub}").mkdir(exist_ok=True)
                shutil.copyfile(f, rd / f"{args.preset}_{sub}" / f.name)
        print(f"[ablation] wrote {rd / (args.preset + '.json')} and its plots/sheets", flush=True)
    print(f"[ablation] done in {time.perf_counter() - t_start:.0f} s (this run; finished stages were reused)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m resampling_forcing.ablation", description=doc_summary(__doc__))
    p.add_argument("--preset", default="cpu", help=f"one of {', '.join(PRESETS)} (default cpu)")
    p.add_argument("--arms", default=None, help=f"comma list (default {','.join(DEFAULT_ARMS)}; also: "
                   f"{', '.join(a for a in ARMS if a not in DEFAULT_ARMS)}; any strength: ar_S, parallel_S, "
                   "ramp_S, e.g. ar_1.2)")
    p.add_argument("--steps", type=int, default=None, help="training steps per arm (default: the preset's)")
    p.add_argument("--resample-steps", type=int, default=1, help="Euler steps from t_s of the resampling arms' "
                   "history degradation (default 1, the paper's)")
    p.add_argument("--resample-cfg", type=float, default=1.0, help="guidance scale of the resampling arms' "
                   "rollout (default 1: none, the restated method's)")
    p.add_argument("--out", default=None, help="work folder (default outputs/ablation/<preset>, with --seed N "
                   "outputs/ablation/<preset>_seedN); a rerun with the same settings resumes it (the data set is "
                   "rendered once into the preset's data.synthetic_dir, shared by every seed: --set "
                   "data.synthetic_dir=DIR to move it)")
    p.add_argument("--report-dir", default=None, help="also copy the report JSON, plots and sheets here (docs/ablation)")
    p.add_argument("--config", default=None, help="train config of the world/model/warmup (default: the preset's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override of that config (repeatable), e.g. --set data.synthetic_videos=64")
    p.add_argument("--warmup", default=None, help="warmup checkpoint/run to start the arms from (default: the preset's asset)")
    p.add_argument("--train-warmup", action="store_true", help="train the warmup into OUT/warmup even if an asset exists")
    p.add_argument("--eval-clips", type=int, default=None, help="evaluation clips (default: the preset's)")
    p.add_argument("--gap-clips", type=int, default=None, help="calibration clips (the exposure-gap diagnostics)")
    p.add_argument("--val-clips", type=int, default=None, help="validation clips that choose the best arm")
    p.add_argument("--no-routing", action="store_true", help="skip the routing evaluation of the best arm")
    p.add_argument("--seed", type=int, default=None, help="training seed of the arms (data order, noise draws; default "
                   "the config's train.seed): a replicate; the data set, warmup and evaluation clips stay the same")
    p.add_argument("--routing-arm", default=None, help="arm whose inference routing is evaluated (default: the best)")
    p.add_argument("--protocols", default="dense,sliding", help="inference attention every arm is evaluated under "
                   "(comma list, dense required): dense = the whole history; sliding = a window of the training "
                   "clip's history, no sink (error accumulation without the given chunk as an anchor); default dense,sliding")
    return p


def resumable_main(prog: str, build, run_fn, argv: Sequence[str] | None) -> int:
    """CLI plumbing of the resumable experiment commands (this one and ablation_memory): a user error is
    one line and exit 2; a stopped training exit 130 with how to resume. `args.argv` keeps the command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build().parse_args(argv)
        args.argv = argv
        return run_fn(args)
    except BadInput as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Interrupted as e:
        print(f"{prog}: {e}; run the same command to resume", file=sys.stderr)
        return 130


def _run_checked(args) -> int:
    for name in ("eval_clips", "gap_clips", "val_clips"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    return resumable_main("ablation", build_parser, _run_checked, argv)


if __name__ == "__main__":
    sys.exit(main())
