#!/usr/bin/env python
"""What the model-free pixel measures (resampling_forcing/eval/pixel.py) cost: seconds per frame and peak
memory, at a resolution and two lengths (memory should not grow with the length: videos are measured block
by block).

    OMP_NUM_THREADS=1 python bench/pixel_cost.py --size 704x1280 --frames 64,256

Each length runs in a fresh process (peak RSS is per process); the frames are a moving random texture made
block by block, so the video itself is never held whole either.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BadInput, OneLineParser, doc_summary, check_out, int_list, run_main  # noqa: E402

_CHILD = """
import json, resource, sys, time
import numpy as np
from resampling_forcing.eval.pixel import BLOCK, measure_blocks
h, w, frames = (int(x) for x in sys.argv[1:4])
base = np.random.default_rng(0).integers(0, 256, (BLOCK, h, w, 3), dtype=np.uint8)
def blocks():
    for i in range(0, frames, BLOCK):
        yield np.roll(base, i, axis=2)[: frames - i]
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
rep = measure_blocks(blocks(), 5 * 24)
sec = time.perf_counter() - t
print(json.dumps({"frames": rep["num_frames"], "seconds_per_frame": sec / rep["num_frames"],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_mib": start / 1024}))
"""


def _main(argv=None):
    p = OneLineParser(prog="bench/pixel_cost.py", description=doc_summary(__doc__))
    p.add_argument("--size", default="704x1280", help="HxW of the frames")
    p.add_argument("--frames", type=int_list(1), default="64,256", help="comma list of lengths")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    check_out("--out", args.out, (".json",))
    try:
        h, w = (int(x) for x in args.size.lower().split("x"))
        assert h >= 3 and w >= 3
    except (ValueError, AssertionError):
        raise BadInput(f"--size {args.size!r}: HxW with both >= 3, e.g. 704x1280") from None
    repo = Path(__file__).resolve().parents[1]
    rows = []
    for f in (int(x) for x in args.frames.split(",")):
        out = subprocess.run([sys.executable, "-c", _CHILD, str(h), str(w), str(f)], capture_output=True, text=True,
                             cwd=repo, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{h}x{w}, {r['frames']} frames: {r['seconds_per_frame']:.3f} s/frame, peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"({r['rss_before_mib']:.0f} MiB before measuring)", flush=True)
        rows.append({"size": [h, w], **r})
    if args.out:
        from resampling_forcing.io import atomic_write_json

        atomic_write_json(args.out, rows)
    return 0


def main(argv=None) -> int:
    return run_main(_main, "bench/pixel_cost.py", argv)


if __name__ == "__main__":
    sys.exit(main())
