#!/usr/bin/env python
"""What far-history positions cost: one cached attention call with and without `rope_horizon`.

    OMP_NUM_THREADS=1 python bench/far_positions.py --threads 1 --histories 6,40 \\
        --out outputs/bench/far_positions.json

The horizon re-rotates, at every call, what it reads of the history beyond the horizon (attention/positions.py):
dense attention rotates every far key (an elementwise pass over the history), window routing only its sink
chunks, top-k on the torch path the queries that read a far chunk (turned back; the kernel gets rotated keys). This times
`cache.CachedAttention` (one layer, queries = the current chunk) at Wan2.1-1.3B's heads (12 x 128) and one
480p latent frame per chunk (1560 tokens) over a history of N chunks filled with random K/V, for dense,
top-k and sink + window routing, horizon None vs --horizon; median of --reps calls after one warm-up.
Random keys make top-k pick at random: its cost here is the routed path's, not a trained model's.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (wan13b_shape, DTYPE_NAMES, BadInput, OneLineParser, doc_summary, add_attention_shape_args, check_out,  # noqa: E402
                          device_name, nonneg_int, positive_int, run_main, setup_device)


def _main(argv=None):
    p = OneLineParser(prog="bench/far_positions.py", description=doc_summary(__doc__))
    add_attention_shape_args(p, history_flag="--histories", history="6,40", topk_flag="--top-k")
    p.add_argument("--tokens", type=positive_int, default=wan13b_shape(1)[2],
                   help="tokens per chunk (default: one 480p latent frame of Wan2.1, 30 x 52 patches)")
    p.add_argument("--horizon", type=positive_int, default=5, help="rope_horizon in chunks")
    p.add_argument("--sink", type=nonneg_int, default=1)
    p.add_argument("--window", type=positive_int, default=4)
    p.add_argument("--reps", type=positive_int, default=5)
    p.add_argument("--device", type=device_name, default="cpu")
    p.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES)
    p.add_argument("--threads", type=nonneg_int, default=None)
    p.add_argument("--out", default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    check_out("--out", args.out, (".json",))
    device, dtype = setup_device(args)
    histories = [int(x) for x in args.histories.split(",")]
    if min(histories) <= args.horizon:
        raise BadInput(f"--histories {args.histories}: each must exceed --horizon {args.horizon} (else nothing moves)")
    import torch

    from resampling_forcing.attention.positions import FarPositions
    from resampling_forcing.attention.spec import RoutingSpec
    from resampling_forcing.cache import CachedAttention, KVCache
    from resampling_forcing.config import ModelConfig
    from resampling_forcing.io import atomic_write_json
    from resampling_forcing.models.wan import rope_frame_freqs
    from resampling_forcing.timing import sync

    T, Hh, D = args.tokens, args.heads, args.head_dim
    # Wan's RoPE theta; one latent frame per chunk (temporal patch 1), as the --tokens default assumes
    pos = FarPositions(args.horizon, rope_frame_freqs(D, ModelConfig.rope_theta, device), 1)
    modes = {"dense": None, "window": RoutingSpec("window", sink_chunks=args.sink, window_chunks=args.window)}
    modes.update({f"top{k}": RoutingSpec("topk", top_k=int(k)) for k in args.top_k.split(",")})
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    print(f"| history chunks | routing | absolute positions (s) | rope_horizon {args.horizon} (s) | ratio |\n|---|---|---|---|---|")
    for n in histories:
        cache = KVCache(1, 1, Hh, D, T, device, dtype, capacity=n)
        for _ in range(n):
            k = torch.randn(1, Hh, T, D, generator=g, device=device, dtype=dtype)
            cache.put_current(0, k, torch.randn(1, Hh, T, D, generator=g, device=device, dtype=dtype))
            cache.put_mean(0, k)
            cache.commit()
        q, k, v = (torch.randn(1, Hh, T, D, generator=g, device=device, dtype=dtype) for _ in range(3))
        for name, spec in modes.items():
            times = {}
            for label, positions in (("absolute", None), ("horizon", pos)):
                op = CachedAttention(cache, "sdpa", routing=spec, positions=positions)
                op(q, k, v, 0)
                ts = []
                for _ in range(args.reps):
                    sync(device)
                    t0 = time.perf_counter()
                    op(q, k, v, 0)
                    sync(device)
                    ts.append(time.perf_counter() - t0)
                times[label] = statistics.median(ts)
            row = {"history": n, "mode": name, "absolute_s": round(times["absolute"], 6),
                   "horizon_s": round(times["horizon"], 6), "ratio": round(times["horizon"] / times["absolute"], 3)}
            rows.append(row)
            print(f"| {n} | {name} | {row['absolute_s']:.4f} | {row['horizon_s']:.4f} | {row['ratio']:.2f} |", flush=True)
    if args.out:
        atomic_write_json(Path(args.out), {"args": vars(args), "rows": rows})
    return 0


def main(argv=None) -> int:
    return run_main(_main, "bench/far_positions.py", argv)


if __name__ == "__main__":
    sys.exit(main())
