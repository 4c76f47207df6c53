#!/usr/bin/env python
"""Long rollouts at flat memory, end to end through sample/sample.py: the peak RSS of the sampling process
and its KV-cache bytes against the number of chunks, for dense attention on the all-resident cache, window
routing on the all-resident cache, and window routing on a bounded cache (which drops the chunks it never
reads). Every case streams its mp4 (the decoded video is never held whole).

    python bench/long_rollout.py --checkpoint assets/tiny-pretrained --chunks 8,32,128 [--modes window-bounded] \\
        --set data.height=128 --set data.width=128 --out outputs/bench/long_rollout.json

Each case runs sample/sample.py in a fresh process: its own peak RSS (os.wait4), with the KV figures, the
frame count and the time from the video's JSON. On CPU the "device" bytes are host memory too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (OneLineParser, doc_summary, BadInput, check_checkpoint, check_out, choice_list, int_list,  # noqa: E402
                          positive_int, run_main)
from resampling_forcing.io import atomic_write_json  # noqa: E402

PROG = "bench/long_rollout.py"
REPO = Path(__file__).resolve().parents[1]
# mode -> the sample.py flags that make it
MODES = {
    "dense": [],  # dense attention, all-resident cache
    "window": ["--routing", "window", "--sink", "1", "--window", "2"],  # sink 1 + window 2, all resident
    "window-bounded": ["--routing", "window", "--sink", "1", "--window", "2", "--kv-resident-chunks", "2"],
}


def run_case(args, chunks: int, flags: list[str], folder: Path) -> dict:
    """One sample.py run in a fresh process: its peak RSS (MiB), wall time and the JSON's figures."""
    out = folder / f"v{chunks}.mp4"
    cmd = [sys.executable, str(REPO / "sample" / "sample.py"), "--checkpoint", args.checkpoint, "--prompt",
           "a red circle bouncing", "--num-chunks", str(chunks), "--steps", str(args.steps), "--cfg", "1",
           "--device", "cpu", "--quiet", "--output", str(out), *flags]
    for s in args.set:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    with open(folder / "stderr.txt", "w+b") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage (Popen.wait would reap it first)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        message = err.read().decode(errors="replace").strip().splitlines()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BadInput(f"sample.py exited {proc.returncode} ({' '.join(cmd[2:])}): {message[-1] if message else ''}")
    meta = json.loads(out.with_suffix(".json").read_text())
    t = meta["timings"]
    out.unlink()
    out.with_suffix(".json").unlink()
    return dict(chunks=chunks, frames=meta["frames"], peak_rss_mib=usage.ru_maxrss / 1024,
                kv_device_mib=t["kv_cache_mib"], kv_total_mib=t["kv_cache_total_mib"], wall_s=wall,
                per_chunk_s=sum(t["per_chunk_s"]) / len(t["per_chunk_s"]))


def _main(argv=None) -> int:
    p = OneLineParser(prog=PROG, description=doc_summary(__doc__))
    p.add_argument("--checkpoint", default="assets/tiny-pretrained")
    p.add_argument("--chunks", type=int_list(1), default="16,64,256")
    p.add_argument("--modes", type=choice_list(list(MODES)), default=",".join(MODES),
                   help=f"comma-separated, of {', '.join(MODES)} (dense's time grows with the square of the length)")
    p.add_argument("--steps", type=positive_int, default=1)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="sample.py --set (repeatable)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    check_out("--out", args.out)
    check_checkpoint("--checkpoint", args.checkpoint)
    from resampling_forcing.pipeline import resolve_config
    from resampling_forcing.pipeline.loading import check_model_overrides

    try:  # the overrides against the checkpoint's config, before the first run
        check_model_overrides(resolve_config(args.checkpoint, overrides=args.set), args.set)
    except ValueError as e:
        raise BadInput(f"--set: {str(e).splitlines()[0]}") from None
    rows = []
    with tempfile.TemporaryDirectory(prefix="long_rollout_") as tmp:
        for mode in args.modes.split(","):
            for n in [int(x) for x in args.chunks.split(",")]:
                row = dict(mode=mode, **run_case(args, n, MODES[mode], Path(tmp)))
                rows.append(row)
                print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
    if args.out:
        atomic_write_json(args.out, dict(rows=rows, steps=args.steps, threads=args.threads, set=args.set,
                                         checkpoint=args.checkpoint))
    return 0


def main(argv=None) -> int:
    return run_main(_main, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
