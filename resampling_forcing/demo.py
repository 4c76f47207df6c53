"""`make demo`: the embedded default end to end on CPU.

1. generate the synthetic bouncing-shapes data set (mp4 + captions, some captions held out),
2. train the tiny model for a few minutes: teacher-forcing warmup, then Resampling Forcing,
3. sample videos 4x longer than the training clips from the held-out captions, with the model
   just trained and with the small checkpoint shipped in assets/ (trained longer with the same
   config, see docs/results.md),
4. evaluate every video against what its caption should show, per training-length segment,
   next to real generator clips of the same captions; the best model also continues the first
   chunk of each real clip, scored against the true continuation (PSNR, centre error),
5. write mp4s, a contact sheet, drift plots and metrics.json to outputs/demo/ (``--out``), where
   the run (``run/``) and the data set (``synthetic/``, unless ``data.synthetic_dir=`` is given) live too.

    python -m resampling_forcing.demo [--out outputs/demo] [--tf-steps N] [--rf-steps N] ...

Stopping it: SIGTERM or Ctrl+C (SIGINT) during training saves the run's checkpoint and ends the demo
there (no sampling from a half-trained model); at any other moment the demo ends at once. Either way
one line on stderr and exit code 143 (SIGTERM) or 130 (SIGINT), the shell's 128 + signal number.
Exit codes otherwise: 0 done, 2 bad arguments or config.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from .checkpoint import config_file
from .cli import BadInput, OneLineParser, check_checkpoint, check_output_dir, check_seed, report_bad_input
from .config import ConfigError, load_config
from .data.synthetic import generate_clip
from .data.synthetic_dataset import INFO_NAME, MANIFEST_NAME
from .eval import evaluate_video, mean_over_videos, plot_drift
from .figures import contact_sheet
from .io import atomic_write_json
from .pipeline import Pipeline, PipelineOutput
from .training import train

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "tiny.yaml"
PRETRAINED = REPO / "assets" / "tiny-pretrained"
SUMMARY_KEYS = ("quality", "object_fidelity", "motion_score", "identity_consistency", "background_clean", "psnr",
                "center_error")


def demo_captions(data_dir: Path, extra: int) -> list[str]:
    """Held-out captions of the generated data set, then `extra` training captions for contrast."""
    info = json.loads((data_dir / INFO_NAME).read_text())
    captions = list(info["held_out_captions"])
    seen = []
    for line in (data_dir / MANIFEST_NAME).read_text().splitlines():
        row = json.loads(line)
        if row.get("split") == "train" and row["caption"] not in seen + captions:
            seen.append(row["caption"])
    return captions + seen[:extra]


def sample_and_eval(name: str, path: Path, captions: list[str], num_chunks: int, seed: int, segment_frames: int,
                    out: Path, real: list[tuple] | None = None,
                    given_chunks: int = 0) -> tuple[list[dict], torch.Tensor, dict]:
    """Roll out `num_chunks` chunks per caption, write out/name/NNN_<caption>.mp4 + JSON (the names and the
    JSON schema of sample/sample.py, PipelineOutput.save, plus `demo_model`, `checkpoint` and, when
    continuing, `given_frames`), score each video.

    With `real` (per caption: uint8 [F, H, W, 3] frames, generator metadata) and `given_chunks` > 0, the
    first `given_chunks` chunks of each real clip are given as history and the videos are also scored
    against the true continuation."""
    pipe = Pipeline.from_pretrained(path, device="cpu")
    history, given, extra = None, 0, {}
    if real is not None and given_chunks > 0:
        given = pipe.vae.frames_for_latents(given_chunks * pipe.chunk_frames)
        history = torch.cat([pipe.load_init_video(frames[:given])[0] for frames, _ in real])
        extra["given_frames"] = given
        print(f"[demo]   {name}: continuing {len(captions)} real clips from their first {given} frames", flush=True)
    else:
        print(f"[demo]   {name}: {len(captions)} rollouts of {num_chunks} chunks from {path}", flush=True)
    res = pipe.generate(captions, num_chunks - (given_chunks if history is not None else 0), seed=seed,
                        init_latents=history)
    output = PipelineOutput(frames=res.video, result=res, fps=pipe.config.data.fps, seed=seed,
                            indices=list(range(len(captions))), pipeline=pipe.describe())
    paths = output.save(out / name, extra=dict(demo_model=name, checkpoint=str(path), **extra))
    results = []
    for i, (caption, mp4) in enumerate(zip(captions, paths)):
        video = res.video[i].numpy()  # the frames before H.264 encoding (README: the eval CLI reads the mp4)
        ref, meta = real[i] if history is not None else (None, None)
        results.append(evaluate_video(video, caption, segment_frames=segment_frames, reference=ref,
                                      reference_meta=meta, name=mp4.name))
    return results, res.video, res.timings


def summarize(results: list[dict]) -> dict:
    means = mean_over_videos(results)
    return {"per_segment": means,
            "first_segment": {k: means[0].get(k) for k in SUMMARY_KEYS},
            "last_segment": {k: means[-1].get(k) for k in SUMMARY_KEYS}}


EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # 128 + signal number, as a shell reports a process killed by it


class _Terminated(BaseException):
    """SIGTERM outside training (during training the trainer's own handler saves and returns)."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def _stopped(signame: str, where: str) -> int:
    code = EXIT_SIGTERM if signame == "SIGTERM" else EXIT_SIGINT
    print(f"demo: stopped by {signame} {where} (exit {code})", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """The demo; SIGTERM / SIGINT end it with one line on stderr and exit 143 / 130 (module docstring)."""
    try:
        old = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: keep the default handler
        old = None
    try:
        return _main(argv)
    except _Terminated:
        return _stopped("SIGTERM", "before the end; outputs may be incomplete")
    except KeyboardInterrupt as e:  # Ctrl+C outside training, or a second signal during it
        return _stopped("SIGTERM" if "SIGTERM" in str(e) else "SIGINT", "before the end; outputs may be incomplete")
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _check_args(args) -> None:
    """Every flag, before anything is removed or trained."""
    for flag, value, low in (("--tf-steps", args.tf_steps, 0), ("--rf-steps", args.rf_steps, 0),
                             ("--length-factor", args.length_factor, 1), ("--extra-captions", args.extra_captions, 0),
                             ("--continue-chunks", args.continue_chunks, 0)):
        if value < low:
            raise BadInput(f"{flag} must be >= {low} (got {value})")
    if args.tf_steps + args.rf_steps < 1:
        raise BadInput("--tf-steps + --rf-steps must be >= 1 (the demo trains a live model)")
    check_seed("--seed", args.seed)
    if args.pretrained and not Path(args.pretrained).is_dir():
        raise BadInput(f"--pretrained {args.pretrained}: not a checkpoint folder ('' skips the shipped model)")
    if any(o.split("=", 1)[0].strip() == "train.run_dir" for o in args.overrides):
        raise BadInput("the demo trains into --out/run (and removes the previous demo run there); "
                       "move it with --out instead of train.run_dir")
    check_output_dir("--out", args.out)


def _preflight(args, cfg) -> tuple[int, int]:
    """What needs the config, before anything is removed, rendered or trained: --pretrained as sample.py
    checks a checkpoint, --continue-chunks against the rollout, and the rollout's memory lower bound for
    every model sampled (memory.py; Pipeline.generate would refuse it only after training) ->
    (chunks, frames) of a rollout."""
    from .config import synthetic_seed
    from .data.synthetic_dataset import held_out_combos
    from .memory import check_fits, codec_geometry, latent_frames, pixel_frames, rollout_need
    from .options import SamplingOptions

    geo = codec_geometry(cfg)  # the encoders' geometry without building them (a Wan VAE loads for minutes)
    num_chunks = args.length_factor * latent_frames(geo, cfg.data.num_frames) // cfg.model.chunk_frames
    if num_chunks < 1:
        raise BadInput(f"--length-factor {args.length_factor}: a rollout of {num_chunks} chunks; raise it or "
                       "data.num_frames")
    if args.continue_chunks >= num_chunks:
        raise BadInput(f"--continue-chunks {args.continue_chunks} must be < the rollout's {num_chunks} chunks "
                       f"(--length-factor {args.length_factor}); lower it, or 0 to skip the continuation")
    models = {"live": cfg}
    if args.pretrained:
        models["pretrained"] = check_checkpoint("--pretrained", args.pretrained,
                                                "or --pretrained '' to skip the shipped model")
    # the captions sampled at once: the held-out ones (as the data set draws them) and --extra-captions
    batch = len(held_out_combos(max_objects=cfg.data.synthetic_max_objects, seed=synthetic_seed(cfg))) \
        + args.extra_captions
    for name, model_cfg in models.items():
        try:
            opts = SamplingOptions.from_config(model_cfg, "cpu")
        except (ValueError, TypeError) as e:
            raise BadInput(f"{name} model's sampling settings: {e}") from None
        need = rollout_need(model_cfg, opts, num_chunks, max(batch, 1), 4)  # fp32 on the CPU (Pipeline's default)
        msg = check_fits(need, "cpu", f"sampling the {name} model ({max(batch, 1)} captions x {num_chunks} chunks)",
                         "lower --length-factor (or --extra-captions)")
        if msg:
            raise BadInput(msg)
    return num_chunks, pixel_frames(geo, num_chunks * cfg.model.chunk_frames)


DEMO_MARK = ".demo-run"  # in a run folder the demo made: a later demo may delete it
# what a demo writes beside its run (removed with a previous demo run): the videos of each model, plots, sheet
PREVIOUS_OUTPUTS = ("live", "pretrained", "*_continued", "drift_*.png", "contact_sheet.png", "metrics.json")


def _is_demo_run(run: Path) -> bool:
    """`run` was made by the demo: its mark, or (a run of an earlier demo, without one) a config.yaml whose
    run and data folders are the demo's layout under the same --out."""
    import yaml

    if (run / DEMO_MARK).is_file():
        return True
    try:
        saved = yaml.safe_load(config_file(run).read_text()) or {}
        return (Path(saved["train"]["run_dir"]).resolve() == run.resolve()
                and Path(saved["data"]["synthetic_dir"]).resolve() == (run.parent / "synthetic").resolve())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError):
        return False


def _main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m resampling_forcing.demo", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="where the run, the data set and the videos go (default outputs/demo)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config (default configs/tiny.yaml)")
    p.add_argument("--tf-steps", type=int, default=250, help="teacher-forcing warmup steps (default 250)")
    p.add_argument("--rf-steps", type=int, default=100, help="Resampling Forcing steps (default 100)")
    p.add_argument("--length-factor", type=int, default=4, help="rollout length / training clip length (default 4)")
    p.add_argument("--extra-captions", type=int, default=2, help="training captions sampled besides held-out ones (default 2)")
    p.add_argument("--pretrained", default=str(PRETRAINED), help="shipped checkpoint ('' to skip)")
    p.add_argument("--continue-chunks", type=int, default=1,
                   help="chunks of each real clip given to the continuation run (0 to skip it; default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    try:
        args = p.parse_args(argv)
        _check_args(args)
        out = Path(args.out)
        # everything the demo writes goes under --out: the run and (unless overridden) the data set
        try:
            cfg = load_config(args.config, [f"train.run_dir={out / 'run'}", f"data.synthetic_dir={out / 'synthetic'}",
                                            *args.overrides])
        except ConfigError as e:
            raise BadInput(str(e)) from None
        if len(cfg.train.stages) != 2:
            raise BadInput("the demo config needs two stages (teacher forcing, resampling)")
        cfg.train.stages[0].steps, cfg.train.stages[1].steps = args.tf_steps, args.rf_steps
        num_chunks, rollout_frames = _preflight(args, cfg)
        run = Path(cfg.train.run_dir)
        if run.exists() and not _is_demo_run(run):
            raise BadInput(f"{run} exists and is not a demo run (no {DEMO_MARK}, and its config.yaml is not a "
                           "demo's): the demo would delete it; choose another --out, or remove it yourself")
    except BadInput as e:
        return report_bad_input("demo", e)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    start = time.time()
    if run.exists():  # a previous demo's run may come from other code or settings: train afresh
        print(f"[demo] removing the previous demo run {run} and its outputs", flush=True)
        shutil.rmtree(run)
        for name in PREVIOUS_OUTPUTS:  # a new run that writes fewer must not show the old ones beside it
            for path in out.glob(name):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
    run.mkdir(parents=True)
    (run / DEMO_MARK).touch()  # what lets a later demo delete it

    print(f"[demo] 1-2/5 data + training ({args.tf_steps} teacher-forcing + {args.rf_steps} resampling steps) "
          f"-> {out / 'run'}", flush=True)
    # the trainer's usual advice ("run the same command") would delete this run: a demo trains afresh
    result = train(cfg, resume_hint=f"resume this run with: python train/train.py --config {config_file(run)} "
                                    "(a new demo run starts over)")
    if result["status"] != "completed":  # SIGTERM/SIGINT: the trainer saved; do not sample a half-trained model
        return _stopped(result.get("signal") or "SIGINT",
                        f"during training at step {result['step']} (checkpoint {result['checkpoint']}); not sampling")
    t_train = time.time() - start

    data_dir = Path(cfg.data.synthetic_dir)
    captions = demo_captions(data_dir, args.extra_captions)
    clip_frames = cfg.data.num_frames
    print(f"[demo] 3/5 sampling {len(captions)} captions x {rollout_frames} frames "
          f"({args.length_factor}x the {clip_frames}-frame training clips)", flush=True)

    models = {"live": out / "run"}
    if args.pretrained:
        models["pretrained"] = Path(args.pretrained)
    metrics, rows, labels, timings = {}, [], [], {}
    for name, path in models.items():
        results, video, timings[name] = sample_and_eval(name, path, captions, num_chunks, args.seed,
                                                        clip_frames, out)
        metrics[name] = summarize(results)
        plot_drift(results, out / f"drift_{name}.png", title=f"{name}: per {clip_frames}-frame segment")
        rows += list(video.numpy())
        labels += [f"{name}: {c}" for c in captions]

    print("[demo] 4/5 evaluating real generator clips of the same captions (the ceiling)", flush=True)
    clips = [generate_clip(10_000 + i, frames=rollout_frames, size=(cfg.data.height, cfg.data.width), caption=caption)
             for i, caption in enumerate(captions)]
    real = [evaluate_video(frames, caption, segment_frames=clip_frames, name=f"real_{i}")
            for i, ((frames, _), caption) in enumerate(zip(clips, captions))]
    metrics["real"] = summarize(real)
    if 0 < args.continue_chunks < num_chunks:
        best = "pretrained" if "pretrained" in models else "live"
        name = f"{best}_continued"
        results, video, timings[name] = sample_and_eval(name, models[best], captions, num_chunks, args.seed,
                                                        clip_frames, out, real=clips, given_chunks=args.continue_chunks)
        metrics[name] = summarize(results)
        plot_drift(results, out / f"drift_{name}.png",
                   title=f"{name}: per {clip_frames}-frame segment, vs the true continuation")
        rows += list(video.numpy())
        labels += [f"{name}: {c}" for c in captions]
    rows += [frames for frames, _ in clips]
    labels += [f"real: {c}" for c in captions]

    print("[demo] 5/5 writing contact sheet, plots and metrics", flush=True)
    contact_sheet(rows, out / "contact_sheet.png", every=2, labels=labels, scale=2)
    atomic_write_json(out / "metrics.json", dict(
        captions=captions, rollout_frames=rollout_frames, segment_frames=clip_frames,
        train_steps=dict(teacher_forcing=args.tf_steps, resampling=args.rf_steps),
        train_seconds=round(t_train, 1), total_seconds=round(time.time() - start, 1),
        sampling_timings=timings, models=metrics))

    print(f"\n[demo] done in {time.time() - start:.0f} s. Mean scores per {clip_frames}-frame segment "
          "(quality = mean of fidelity, motion, identity, background; 1 is perfect):")
    for name, m in metrics.items():
        q = [s.get("quality") for s in m["per_segment"]]
        print(f"  {name:<11} " + "  ".join("-" if v is None else f"{v:.2f}" for v in q))
    videos = ", ".join(f"{name}/*.mp4" for name in metrics if name != "real")
    print(f"\noutputs in {out}/: {videos}, contact_sheet.png, drift_*.png, metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
