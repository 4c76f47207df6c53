"""Memory probe of history routing: after a blackout, does a continuation bring back what
the model saw before it, and which inference routing keeps that memory?

    python -m resampling_forcing.ablation_memory [--out DIR] [--report-dir docs/ablation] [--steps N]

The main ablation's world never hides anything, so nothing there needs history older than a short
window. Here every probe clip is [V visible frames | L blackout frames (background only; the objects
move on unseen) | A frames after]. The model is given the first V + L frames (the truth, through its KV
cache) and continues A frames; the A frames are scored against the truth and the caption. A window
shorter than the blackout sees only dark frames, so whatever it brings back must come from the caption
alone; a model that routes to the chunks before the blackout can bring back the objects themselves.

1. Model: the ablation's best arm (``assets/ablation/ar_0.6``) trained ``steps`` more steps with the same
   objective on the occlusion world of ``configs/ablation_memory.yaml`` (half of the clips have a 4-6
   frame blackout), so that it has seen objects come back. Resumable (training.train's checkpoints).
2. Probe: held-out clips (ablation_eval.eval_clips, the blackout at the same place in every clip),
   continued under each inference routing of ``MODES`` with two conditionings: the caption (CFG as
   configured) and none (empty prompt, CFG 1: the objects can come only from the history). The
   routed modes also record which history chunks their queries pick (share before the blackout).
3. Sanity check of the metrics on the A frames: the truth, objects that never return (background), and
   another clip's frames.
4. Report: OUT/report.json (+ ``--report-dir``: ``memory.json`` and one contact sheet per conditioning).
   Every result is a file in OUT; a rerun skips what exists.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .ablation import _finished, _path, _train, resumable_main
from .ablation_layout import REPORT_FILE, eval_file, file_stem, sheet_path, sheets_dir
from .cli import BadInput, OneLineParser, check_checkpoint, check_output_dir, check_seed, doc_summary

__all__ = ["MODES", "CONDITIONINGS", "probe_clips", "after", "continue_probe", "memory_sanity", "run", "main"]

CONFIG = "configs/ablation_memory.yaml"
VISIBLE, BLACKOUT, AFTER = 16, 6, 12  # frames of a probe clip: seen | dark | continued
MODES = {  # inference routing (RoutingSpec arguments; None = dense)
    "dense": None,
    "top-1": ("topk", 1, 0, 0),
    "top-3": ("topk", 3, 0, 0),
    "window 1": ("window", None, 0, 1),
    "window 3": ("window", None, 0, 3),
    "sink 1 + window 3": ("window", None, 1, 3),
}
CONDITIONINGS = ("caption", "none")
SCORED = ("object_fidelity", "color_acc", "count_acc", "shape_acc", "psnr", "center_error", "collapse")


def probe_clips(data_cfg, num: int, dataset_seed: int = 0, visible: int = VISIBLE, blackout: int = BLACKOUT,
                after_frames: int = AFTER) -> list[tuple[np.ndarray, dict]]:
    """``num`` held-out clips of ``visible + blackout + after_frames`` frames, dark in the middle."""
    from .ablation_eval import eval_clips

    return eval_clips(data_cfg, num, visible + blackout + after_frames, dataset_seed, blackout=(visible, blackout))


def after(clips: Sequence[tuple[np.ndarray, dict]], start: int) -> list[tuple[np.ndarray, dict]]:
    """The clips' frames from ``start`` on, with their per-frame metadata (what the probe scores)."""
    return [(v[start:], {**m, "frames": m["frames"][start:], "num_frames": len(v) - start}) for v, m in clips]


def continue_probe(pipe, clips, given_chunks: int, routing, conditioning: str, seed: int = 0,
                   batch: int = 32) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Continue each clip from its first ``given_chunks`` chunks to its end -> (uint8 [B, F, H, W, 3],
    selection frequencies [chunks, layers, heads, history] averaged over the clips, or None when dense).
    Sample i uses the noise of (seed, i) in every mode, so the modes are paired."""
    import torch

    total = clips[0][0].shape[0]
    given = pipe.vae.frames_for_latents(given_chunks * pipe.chunk_frames)
    new_chunks = pipe.vae.latents_for_frames(total) // pipe.chunk_frames - given_chunks
    routed = routing != "dense"
    videos, sels = [], []
    for lo in range(0, len(clips), batch):
        part = clips[lo:lo + batch]
        history = torch.cat([pipe.load_init_video(v[:given])[0] for v, _ in part])
        prompts = [m["caption"] for _, m in part] if conditioning == "caption" else [""] * len(part)
        res = pipe.generate(prompts, new_chunks, seed=seed, indices=list(range(lo, lo + len(part))),
                            init_latents=history, routing=routing, record_selection=routed,
                            cfg_scale=None if conditioning == "caption" else 1.0)
        videos.extend(res.video[i].numpy()[:total] for i in range(len(part)))
        if routed:
            sels.append(res.selection.sum(0))  # [chunks, layers, heads, history], summed over the clips
    sel = np.sum(sels, axis=0) / len(clips) if routed else None
    return np.stack(videos), sel


def memory_sanity(clips, start: int, segment: int) -> dict:
    """Metrics of the A frames for known continuations: the truth, objects that never return
    (background only), another clip's frames (wrong objects)."""
    from .ablation_eval import metric_arrays, score
    from .stats import interval

    truth = np.stack([v for v, _ in clips])
    gone = truth.copy()
    gone[:, start:] = truth[:, start - 1:start]  # the last blackout frame: background only
    cases = {"truth": truth, "objects never return": gone, "other clip": np.concatenate([truth[1:], truth[:1]])}
    tail = after(clips, start)
    return {name: {m: interval(a[:, 0]) for m, a in metric_arrays(score(v[:, start:], tail, segment)).items()}
            for name, v in cases.items()}


@functools.lru_cache(maxsize=2)
def _pipeline(checkpoint: str):
    """One loaded model per checkpoint for all its (mode, conditioning) evaluations (the sampler keeps no
    state between generate calls)."""
    from .pipeline import Pipeline

    return Pipeline.from_pretrained(checkpoint, device="cpu")


def _evaluate(name, checkpoint, clips, visible: int, given_chunks: int, spec, conditioning, out: Path,
              seed: int) -> dict:
    """One (mode, conditioning) -> {"arrays": per-clip metrics of the frames after the blackout,
    "before": share of the first continued chunk's selections that land on chunks before the blackout
    (routed modes), "seconds"}; cached in OUT/eval (with the first 4 videos, for the contact sheets)."""
    from .ablation_eval import cache_key, cached, metric_arrays, score
    from .attention.routing import RoutingSpec

    stem = file_stem(f"{name}_{conditioning}")
    path = eval_file(out, stem)
    start = clips[0][1]["blackout"][0] + clips[0][1]["blackout"][1]
    key = cache_key(checkpoint, clips=len(clips), visible=visible, given=given_chunks, spec=spec, seed=seed)
    if not cached(path, key):
        t0 = time.perf_counter()
        pipe = _pipeline(str(checkpoint))
        videos, sel = continue_probe(pipe, clips, given_chunks, RoutingSpec(*spec) if spec else "dense",
                                     conditioning, seed=seed)
        arrays = metric_arrays(score(videos[:, start:], after(clips, start), videos.shape[1] - start))
        before = np.nan
        if sel is not None:  # sel [chunks, layers, heads, history]: row given_chunks = the first new chunk
            seen = pipe.vae.latents_for_frames(visible) // pipe.chunk_frames
            before = float(np.nansum(sel[given_chunks, :, :, :seen]) / np.nansum(sel[given_chunks]))
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path.with_name(f"{stem}.videos.npy"), videos[:4])
        tmp = path.with_name(f".{stem}.tmp.npz")
        np.savez(tmp, seconds=time.perf_counter() - t0, before=before, key=key, **arrays)
        tmp.replace(path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k not in ("seconds", "before", "key")}
        before = None if np.isnan(z["before"]) else round(float(z["before"]), 4)
        seconds = round(float(z["seconds"]), 1)
    return dict(arrays=arrays, before=before, seconds=seconds)


def run(args) -> int:
    from .stats import interval
    from .config import ConfigError, load_config, synthetic_seed
    from .figures import contact_sheet
    from .io import atomic_write_json

    config = _path(args.config)
    try:
        base = load_config(config, args.overrides)
    except ConfigError as e:
        raise BadInput(str(e).splitlines()[0]) from None
    steps = sum(s.steps for s in base.train.stages) if args.steps is None else args.steps
    if steps < 1 or args.clips < 1:
        raise BadInput(f"--steps and --clips must be >= 1 (got {steps}, {args.clips})")
    check_seed("--seed", args.seed)
    out = check_output_dir("--out", args.out)
    if args.report_dir is not None:
        check_output_dir("--report-dir", args.report_dir)
    t_start = time.perf_counter()
    cf = base.model.chunk_frames  # the ablation worlds' PixelShuffleVAE is 1:1 in time
    if (VISIBLE + BLACKOUT) % cf or AFTER % cf:
        raise BadInput(f"the probe's {VISIBLE} + {BLACKOUT} given and {AFTER} new frames must be whole chunks of {cf}")
    given_chunks, start = (VISIBLE + BLACKOUT) // cf, VISIBLE + BLACKOUT

    # 1. the model: the best arm trained on in the occlusion world
    run_dir = out / "train"
    init = _path(base.train.init_from) if base.train.init_from else None
    if init is None or not init.is_dir():
        raise BadInput(f"train.init_from={base.train.init_from!r} is not a run or checkpoint folder; pass "
                       "--set train.init_from=RUN_OR_CHECKPOINT")
    # its weights are read after the occlusion data set is rendered (minutes): checked now, as sample.py would
    check_checkpoint("train.init_from", init, "--set train.init_from=RUN_OR_CHECKPOINT")
    out.mkdir(parents=True, exist_ok=True)
    stage = dict(dataclasses.asdict(base.train.stages[-1]), steps=steps)
    overrides = list(args.overrides) + [f"train.run_dir={run_dir}", f"train.init_from={init}",
                                        f"train.stages={json.dumps([stage])}", "train.tensorboard=false"]
    if not _finished(run_dir, steps, config, overrides):
        print(f"[memory] training {init} on for {steps} steps in the occlusion world ({config})", flush=True)
        _train(config, overrides)
    models = {"trained": run_dir, "before": init}

    # 2. probe clips and the metrics' sanity check
    clips = probe_clips(base.data, args.clips, synthetic_seed(base), VISIBLE, BLACKOUT, AFTER)
    print(f"[memory] {len(clips)} probe clips: {VISIBLE} visible + {BLACKOUT} dark frames given, {AFTER} continued",
          flush=True)
    sanity_path = out / f"sanity_{len(clips)}.json"  # keyed by the clips it checks
    if not sanity_path.is_file():
        atomic_write_json(sanity_path, memory_sanity(clips, start, AFTER))
    sanity = json.loads(sanity_path.read_text())

    # 3. every mode x conditioning of the trained model; dense for the model before (never saw a blackout)
    results: dict = {}
    for cond in CONDITIONINGS:
        results[f"before dense {cond}"] = _evaluate("before dense", models["before"], clips, VISIBLE, given_chunks,
                                                    None, cond, out, args.seed)
        for mode, spec in MODES.items():
            print(f"[memory] {mode}, conditioning: {cond}", flush=True)
            results[f"{mode} {cond}"] = _evaluate(mode, run_dir, clips, VISIBLE, given_chunks, spec, cond, out, args.seed)

    # 4. report
    def entry(key, cond):
        r = results[key]
        return dict(after={m: interval(r["arrays"][m][:, 0]) for m in SCORED}, picks_before_blackout=r["before"],
                    vs_dense={m: interval(r["arrays"][m][:, 0] - results[f"dense {cond}"]["arrays"][m][:, 0])
                              for m in SCORED}, seconds=r["seconds"])

    report = dict(
        command=" ".join(["python -m resampling_forcing.ablation_memory"] + (args.argv or [])),
        config=str(config), init_from=str(init), steps=steps,
        probe=dict(clips=len(clips), visible_frames=VISIBLE, blackout_frames=BLACKOUT, after_frames=AFTER,
                   given_chunks=given_chunks, seed=args.seed, sampler=dict(steps=base.diffusion.sample_steps,
                   shift=base.diffusion.sample_shift, cfg=base.diffusion.cfg_scale),
                   conditionings={"caption": "the clip's caption, CFG as configured",
                                  "none": "empty prompt, CFG 1 (the objects can come only from the history)"},
                   interval="mean +- t975(n-1) sd / sqrt(n) over clips; vs_dense paired over the same clips and noise",
                   picks_before_blackout="share of the first continued chunk's (query, head, layer) picks on "
                                         "history chunks before the blackout"),
        sanity=sanity, modes={cond: {mode: entry(f"{mode} {cond}", cond) for mode in MODES} for cond in CONDITIONINGS},
        before_training={cond: dict(after={m: interval(results[f"before dense {cond}"]["arrays"][m][:, 0])
                                           for m in SCORED}) for cond in CONDITIONINGS},
        wall_seconds_this_run=round(time.perf_counter() - t_start, 1))
    atomic_write_json(out / REPORT_FILE, report)
    for cond in CONDITIONINGS:  # rows: truth, then every mode, for the first 2 clips
        rows, labels = [], []
        for c in range(2):
            rows.append(clips[c][0]), labels.append(f"clip {c} truth")
            for mode in MODES:
                rows.append(np.load(eval_file(out, file_stem(f"{mode}_{cond}"), ".videos.npy"))[c]), labels.append(mode)
        contact_sheet(rows, sheet_path(out, f"memory_{cond}"), every=2, labels=labels, last=True)
    print(table(report), flush=True)
    if args.report_dir:
        rd = Path(args.report_dir)
        (rd / "memory_sheets").mkdir(parents=True, exist_ok=True)
        atomic_write_json(rd / "memory.json", report)
        for f in sorted(sheets_dir(out).glob("*.png")):
            shutil.copyfile(f, rd / "memory_sheets" / f.name)
        print(f"[memory] wrote {rd / 'memory.json'} and its sheets", flush=True)
    print(f"[memory] done in {time.perf_counter() - t_start:.0f} s (this run; finished stages were reused)")
    return 0


def table(report: dict) -> str:
    """Markdown: the frames after the blackout per conditioning and mode (95% intervals)."""
    cols = ("object_fidelity", "color_acc", "count_acc", "psnr", "collapse")
    rows = ["| conditioning | inference attention | picks before blackout | " + " | ".join(cols) + " |",
            "|---" * (len(cols) + 3) + "|"]

    def cell(s):
        return "n/a" if s["mean"] is None else f"{s['mean']:.3f} ± {s['ci95']:.3f}"

    for cond, modes in report["modes"].items():
        b = report["before_training"][cond]["after"]
        rows.append(f"| {cond} | dense, before occlusion training | - | " + " | ".join(cell(b[c]) for c in cols) + " |")
        for mode, e in modes.items():
            p = "-" if e["picks_before_blackout"] is None else f"{e['picks_before_blackout']:.2f}"
            rows.append(f"| {cond} | {mode} | {p} | " + " | ".join(cell(e["after"][c]) for c in cols) + " |")
    return "\n".join(rows)


def build_parser():
    p = OneLineParser(prog="python -m resampling_forcing.ablation_memory", description=doc_summary(__doc__))
    p.add_argument("--out", default="outputs/ablation/memory",
                   help="work folder; a rerun resumes it (the data set is rendered once into the config's "
                   "data.synthetic_dir, shared between runs: --set data.synthetic_dir=DIR to move it)")
    p.add_argument("--report-dir", default=None, help="also copy memory.json and the sheets here (docs/ablation)")
    p.add_argument("--config", default=CONFIG, help=f"the occlusion world and the training (default {CONFIG})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override of that config (repeatable), e.g. --set train.init_from=PATH")
    p.add_argument("--steps", type=int, default=None, help="training steps in the occlusion world (default: the config's)")
    p.add_argument("--clips", type=int, default=32, help="probe clips (default 32)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (sample i uses (seed, i))")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return resumable_main("ablation_memory", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
