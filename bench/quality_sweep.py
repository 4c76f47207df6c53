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
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from resampling_forcing.data.synthetic import (DEFAULT_COLORS, DEFAULT_SHAPES, all_combos,  # noqa: E402
                                               held_out_combos, make_caption)
from resampling_forcing.eval import evaluate_video, mean_over_videos  # noqa: E402
from resampling_forcing.io import atomic_write_json  # noqa: E402
from resampling_forcing.pipeline import Pipeline  # noqa: E402
from resampling_forcing.timing import Stopwatch  # noqa: E402


def sweep_captions(max_objects: int, seed: int, train_captions: int) -> tuple[list[str], int]:
    """(held-out captions + the first `train_captions` multi-object training captions, #held out), for
    the data set train/train.py generates (the generator's default colours and shapes)."""
    held = held_out_combos(DEFAULT_COLORS, DEFAULT_SHAPES, max_objects=max_objects, seed=seed)
    seen = [c for c in all_combos(DEFAULT_COLORS, DEFAULT_SHAPES, max_objects) if len(c) > 1 and c not in held]
    return [make_caption(c) for c in held + seen[:train_captions]], len(held)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="assets/tiny-pretrained")
    p.add_argument("--settings", nargs="+", default=["{}"], help="JSON objects of generate() kwargs")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--length-factor", type=int, default=4, help="rollout length / training clip length")
    p.add_argument("--train-captions", type=int, default=2)
    p.add_argument("--out", help="write all numbers as JSON here")
    args = p.parse_args(argv)
    try:
        settings = [json.loads(s) for s in args.settings]
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as e:
        print(f"quality_sweep: error: bad --settings/--seeds ({e}); expected JSON objects and e.g. 0,1,2",
              file=sys.stderr)
        return 2
    pipe = Pipeline.from_pretrained(args.checkpoint, device="cpu")
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


if __name__ == "__main__":
    sys.exit(main())
