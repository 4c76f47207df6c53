#!/usr/bin/env python
"""What a prompt switch does on a synthetic-world checkpoint: keep vs recache.

Rolls out `--chunks` chunks of "a red circle bouncing" per seed, switching at `--switch` to "a blue
circle bouncing" with the cached history kept as written (`keep`) or re-encoded under the new text
(`recache`), plus the no-switch rollouts of either prompt (`old_only`, `new_only`). Measured with the drift evaluation's object detector
(resampling_forcing.eval.detect) on the decoded frames:

- `new_color_ever`: fraction of seeds where a blue object shows at any time after the switch;
- `frames_to_new_color`: frames after the switch until a blue object shows (mean over the seeds where
  one does);
- `new_color_first_chunk` / `new_color_last_chunk`: fraction of the frames of the first chunk after
  the switch / of the last chunk that show a blue object (how fast and how fully the text takes);
- `old_color_last_chunk`: fraction of the last chunk's frames still showing a red object;
- `objects_last_chunk`: mean number of detected objects per frame in the last chunk (1 = the one
  object was kept, not duplicated or lost);
- `jump_px`: centroid distance of the object between the last frame before the switch and the first
  after it, `step_px` the mean frame-to-frame displacement before the switch (continuity);
- `total_denoise_s`: rollout time without decode (recache adds one cache-writing pass per history chunk).
With `--window N` keep/recache are also run with sliding-window routing (the red history falls out).

    python bench/prompt_switch.py --checkpoint assets/tiny-pretrained --seeds 0-7 --chunks 12 --switch 4 \\
        --window 2 --out outputs/bench/switch.json
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import (OneLineParser, doc_summary, BadInput, check_checkpoint, check_out, nonneg_int, positive_int,  # noqa: E402
                          run_main, seed_range)
from resampling_forcing.eval import detect  # noqa: E402
from resampling_forcing.io import atomic_write_json  # noqa: E402
from resampling_forcing.pipeline import Pipeline  # noqa: E402

PROG = "bench/prompt_switch.py"
OLD, NEW = ("red", "a red circle bouncing"), ("blue", "a blue circle bouncing")


def _largest(blobs):
    return max(blobs, key=lambda b: b.area) if blobs else None


def measure(video: np.ndarray, f_switch: int, f_last: int, f_chunk: int) -> dict:
    blobs, _, _ = detect(video)
    has = lambda c, rng: float(np.mean([any(b.color == c for b in blobs[t]) for t in rng]))  # noqa: E731
    first = range(f_switch, min(f_switch + f_chunk, len(blobs)))
    last = range(f_last, len(blobs))
    pre = [_largest(blobs[t]) for t in range(f_switch)]
    steps = [np.hypot(a.cx - b.cx, a.cy - b.cy) for a, b in zip(pre, pre[1:]) if a is not None and b is not None]
    a, b = _largest(blobs[f_switch - 1]), _largest(blobs[f_switch])
    seen = [t - f_switch for t in range(f_switch, len(blobs)) if any(b.color == NEW[0] for b in blobs[t])]
    return dict(new_color_ever=float(bool(seen)), frames_to_new_color=float(seen[0]) if seen else None, new_color_first_chunk=has(NEW[0], first), new_color_last_chunk=has(NEW[0], last),
                old_color_last_chunk=has(OLD[0], last),
                objects_last_chunk=float(np.mean([len(blobs[t]) for t in last])),
                jump_px=None if a is None or b is None else float(np.hypot(a.cx - b.cx, a.cy - b.cy)),
                step_px=float(np.mean(steps)) if steps else None)


def _main(argv=None) -> int:
    p = OneLineParser(prog=PROG, description=doc_summary(__doc__))
    p.add_argument("--checkpoint", default="assets/tiny-pretrained")
    p.add_argument("--seeds", type=seed_range, default="0-7", help="a-b or a,b,c")
    p.add_argument("--chunks", type=positive_int, default=8)
    p.add_argument("--switch", type=positive_int, default=4)
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--window", type=nonneg_int, default=0,
                   help="also run keep/recache with a sliding window of N chunks")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.chunks < 2:
        raise BadInput(f"--chunks {args.chunks}: a prompt switch needs at least 2 chunks (one before, one after)")
    if args.switch >= args.chunks:
        raise BadInput(f"--switch {args.switch} must be below --chunks {args.chunks} (the chunk where the new "
                       f"prompt starts: 1..{args.chunks - 1})")
    check_out("--out", args.out)
    check_checkpoint("--checkpoint", args.checkpoint)
    seeds = (list(range(int(args.seeds.split("-")[0]), int(args.seeds.split("-")[1]) + 1)) if "-" in args.seeds
             else [int(s) for s in args.seeds.split(",")])
    try:
        pipe = Pipeline.from_pretrained(args.checkpoint, device="auto")
        pipe.sampling_options(steps=args.steps, window=args.window or None)  # the flags against its config
    except ValueError as e:
        raise BadInput(f"--checkpoint {args.checkpoint}: {e}") from None
    f_switch, f_last = pipe.frames_for_chunks(args.switch), pipe.frames_for_chunks(args.chunks - 1)
    f_chunk = pipe.frames_for_chunks(1)
    rows = {}
    modes = ["old_only", "new_only", "keep", "recache"]
    if args.window:
        modes += [f"keep_window{args.window}", f"recache_window{args.window}"]
    for mode in modes:
        per = []
        for seed in seeds:
            board = None if mode.endswith("_only") else [(0, OLD[1]), (args.switch, NEW[1])]
            res = pipe.generate((NEW if mode == "new_only" else OLD)[1] if board is None else None, args.chunks,
                                seed=seed, steps=args.steps, storyboard=board,
                                switch_cache=mode.split("_")[0] if board is not None else "keep",
                                window=args.window if "window" in mode else None)
            per.append(dict(measure(res.video[0].numpy(), f_switch, f_last, f_chunk),
                            total_denoise_s=res.timings["total_denoise_s"]))
        mean = {k: (float(np.mean([r[k] for r in per if r[k] is not None])) if any(r[k] is not None for r in per)
                    else None) for k in per[0]}
        rows[mode] = dict(mean=mean, per_seed=per)
        print(mode.ljust(9), " ".join(f"{k}={v:.3f}" for k, v in mean.items() if v is not None), flush=True)
    if args.out:
        atomic_write_json(args.out, dict(checkpoint=str(args.checkpoint), seeds=seeds, chunks=args.chunks,
                                         switch=args.switch, old=OLD[1], new=NEW[1], results=rows))
    return 0


def main(argv=None) -> int:
    return run_main(_main, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
