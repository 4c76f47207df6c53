#!/usr/bin/env python
"""Sample quality of a synthetic-world checkpoint under several sampling settings.

For each setting, rolls out the held-out captions of the synthetic data set (and `--train-captions`
two-object training captions) once per seed, scores every video with the drift evaluation
(resampling_forcing.eval), and prints the mean quality per training-length segment and overall.
This is how the tiny model's default sampling settings (configs/tiny.yaml) were chosen; the
numbers are in docs/results.md.

    python bench/quality_sweep.py --checkpoint assets/tiny-pretrained --seeds 0,1,2 \\
        --settings '{}' '{"cfg_scale": 4.0}' '{"sink": 1, "window": 4}' --out outputs/bench/quality.json

A setting is a JSON object of `Pipeline.generate` keyword arguments (steps, shift, cfg_scale,
routing, top_k, sink, window, ...); '{}' is the checkpoint's own config.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import (OneLineParser, BadInput, check_checkpoint, check_out, int_list, nonneg_int,  # noqa: E402
                          positive_int, run_main)
from resampling_forcing.cli import MAX_SEED  # noqa: E402
from resampling_forcing.data.synthetic import DEFAULT_COLORS, DEFAULT_SHAPES, make_caption  # noqa: E402
from resampling_forcing.data.synthetic_dataset import all_combos, held_out_combos  # noqa: E402
from resampling_forcing.eval import evaluate_video, mean_over_videos  # noqa: E402
from resampling_forcing.io import atomic_write_json  # noqa: E402
from resampling_forcing.options import SamplingOptions  # noqa: E402
from resampling_forcing.pipeline import Pipeline  # noqa: E402
from resampling_forcing.timing import Stopwatch  # noqa: E402

PROG = "bench/quality_sweep.py"
# generate() keyword arguments a setting may hold: not the ones the sweep sets, nor objects JSON cannot give
SETTING_KEYS = [k for k, v in inspect.signature(Pipeline.generate).parameters.items()
                if v.kind == v.KEYWORD_ONLY and k not in ("seed", "options", "callback", "init_latents")]
# ... of which the sampling settings (checked against the checkpoint's config before the first rollout)
SAMPLING_KEYS = {"routing", "top_k", "sink", "window"} | {f.name for f in SamplingOptions.__dataclass_fields__.values()}


def parse_setting(text: str) -> dict:
    """One --settings value: a JSON object of generate() keyword arguments (BadInput naming the flag)."""
    try:
        setting = json.loads(text)
    except ValueError as e:
        raise BadInput(f"bad --settings {text!r}: not JSON ({e}); "
                       "expected a JSON object such as '{\"steps\": 2}'") from None
    if not isinstance(setting, dict):
        raise BadInput(f"bad --settings {text!r}: a JSON object of generate() keyword arguments is expected, "
                       f"not a {type(setting).__name__}; e.g. '{{\"cfg_scale\": 4.0}}'")
    unknown = [k for k in setting if k not in SETTING_KEYS]
    if unknown:
        raise BadInput(f"bad --settings {text!r}: unknown key(s) {', '.join(map(repr, unknown))}; "
                       f"use generate() keyword arguments: {', '.join(SETTING_KEYS)}")
    return setting


def sweep_captions(max_objects: int, seed: int, train_captions: int) -> tuple[list[str], int]:
    """(held-out captions + the first `train_captions` multi-object training captions, #held out), for
    the data set train/train.py generates (the generator's default colours and shapes)."""
    held = held_out_combos(DEFAULT_COLORS, DEFAULT_SHAPES, max_objects=max_objects, seed=seed)
    seen = [c for c in all_combos(DEFAULT_COLORS, DEFAULT_SHAPES, max_objects) if len(c) > 1 and c not in held]
    return [make_caption(c) for c in held + seen[:train_captions]], len(held)


def _main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="assets/tiny-pretrained")
    p.add_argument("--settings", nargs="+", default=["{}"], help="JSON objects of generate() kwargs")
    p.add_argument("--seeds", type=int_list(0, MAX_SEED), default="0,1,2")
    p.add_argument("--length-factor", type=positive_int, default=4, help="rollout length / training clip length")
    p.add_argument("--train-captions", type=nonneg_int, default=2)
    p.add_argument("--out", help="write all numbers as JSON here")
    args = p.parse_args(argv)
    settings = [parse_setting(s) for s in args.settings]
    seeds = [int(s) for s in args.seeds.split(",")]
    check_out("--out", args.out)
    check_checkpoint("--checkpoint", args.checkpoint)
    try:
        pipe = Pipeline.from_pretrained(args.checkpoint, device="cpu")
    except ValueError as e:
        raise BadInput(f"--checkpoint {args.checkpoint}: {e}") from None
    for text, setting in zip(args.settings, settings):  # every setting's values, before the first rollout
        try:
            pipe.sampling_options(**{k: v for k, v in setting.items() if k in SAMPLING_KEYS})
        except ValueError as e:
            raise BadInput(f"bad --settings {text!r}: {e}") from None
    cfg = pipe.config
    captions, n_held = sweep_captions(cfg.data.synthetic_max_objects, cfg.train.seed, args.train_captions)
    clip = cfg.data.num_frames
    num_chunks = args.length_factor * pipe.vae.latents_for_frames(clip) // pipe.chunk_frames
    report = dict(checkpoint=args.checkpoint, captions=captions, held_out=n_held, seeds=seeds,
                  num_chunks=num_chunks, segment_frames=clip, settings=[])
    print(f"| setting | quality per {clip}-frame segment | mean | held-out | training captions | s |")
    print("|---|---|---|---|---|---|")
    for setting in settings:
        results = []
        with Stopwatch() as sw:
            for seed in seeds:
                res = pipe.generate(captions, num_chunks, seed=seed, **setting)
                results += [evaluate_video(res.video[i].numpy(), c, segment_frames=clip) for i, c in enumerate(captions)]
        per_seg = [m["quality"] for m in mean_over_videos(results)]
        per_video = [r["overall"]["quality"] for r in results]
        held = [q for i, q in enumerate(per_video) if i % len(captions) < n_held]
        seen = [q for i, q in enumerate(per_video) if i % len(captions) >= n_held]
        row = dict(setting=setting, per_segment=per_seg, mean=float(np.mean(per_video)),
                   held_out=float(np.mean(held)), training=float(np.mean(seen)) if seen else None,
                   seconds=round(sw.seconds, 1))
        report["settings"].append(row)
        training = "-" if row["training"] is None else f"{row['training']:.3f}"
        print(f"| `{json.dumps(setting)}` | {' / '.join(f'{q:.2f}' for q in per_seg)} | {row['mean']:.3f} | "
              f"{row['held_out']:.3f} | {training} | {row['seconds']} |", flush=True)
    if args.out:
        atomic_write_json(args.out, report)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
