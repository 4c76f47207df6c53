#!/usr/bin/env python
"""Bounded-memory rollouts: device and total KV-cache bytes vs rollout length, all-resident
vs `kv_resident_chunks=R` (cache.TieredKVCache), with a bit-for-bit check of the latents and the time.

    python bench/kv_offload.py --checkpoint assets/tiny-pretrained --chunks 4,8,16,32 --resident 2 \\
        [--top-k 2 | --window 2 --sink 1] [--device cuda] --out outputs/bench/kv_offload.json

Also prints the library's estimate for the Wan2.1-1.3B shape at 480p (30 layers, 1536 dim, 4680 tokens per
3-latent-frame chunk, bf16, CFG): K/V bytes on the device and on the host for one minute, all-resident vs
bounded (dense: the staging buffer holds one layer's whole history; with routing also the routed case at
its floor: sink + window (+ k) staged chunks, exact for window routing, which also drops the chunks it
never reads; coherent selections for top-k).
Per length: device / total MiB, seconds, the bounded run's chunk copies from the host tier and the most
history chunks it staged at once, and whether the latents are bit-identical.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (OneLineParser, doc_summary, BadInput, check_checkpoint, check_device, check_out, device_name,  # noqa: E402
                          int_list, nonneg_int, positive_int, run_main)
from resampling_forcing.attention.spec import window_reads  # noqa: E402
from resampling_forcing.cache import KVCache  # noqa: E402
from resampling_forcing.config import Config  # noqa: E402
from resampling_forcing.io import atomic_write_json  # noqa: E402
from resampling_forcing.memory import sample_memory  # noqa: E402
from resampling_forcing.pipeline import Pipeline  # noqa: E402
from resampling_forcing.timing import Stopwatch  # noqa: E402

PROG = "bench/kv_offload.py"
_MADE: list = []  # the caches the rollouts build (the pipeline returns timings, not its cache)
_for_model = KVCache.for_model.__func__


def _spy(cls, *a, **kw):
    _MADE.append(_for_model(cls, *a, **kw))
    return _MADE[-1]


def wan_arithmetic(minutes: float = 1.0, resident: int = 4, staged: int | None = None,
                   keep: tuple[int, int] | None = None) -> dict:
    """The library's estimate (memory.sample_memory) of the K/V bytes of a Wan2.1-1.3B rollout at 480x832,
    16 fps, bf16, CFG: all resident vs `resident` chunks on the device. `staged`: history chunks the staging
    buffer holds (one layer): None = all (dense attention). `keep`: (sink, window) of window routing."""
    cfg = Config()  # the 1.3B sizes (30 layers, dim 1536, 3-latent-frame chunks)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, height=480, width=832, fps=16.0))
    latent_frames = 1 + int(minutes * 60 * cfg.data.fps - 1) // 4
    n = latent_frames // cfg.model.chunk_frames
    est = lambda **kw: sample_memory(cfg, n, 1, 2, cfg_scale=5.0, **kw)["parts"]  # noqa: E731
    full, bounded = est(), est(kv_resident_chunks=resident, kv_staged_chunks=staged, kv_keep=keep)
    chunk = full["kv cache"] / n
    return dict(chunks=n, chunk_gib=chunk / 2**30, all_resident_gib=full["kv cache"] / 2**30,
                bounded_device_gib=bounded["kv cache"] / 2**30,
                bounded_host_gib=bounded["kv cache (host tier)"] / 2**30, resident_chunks=resident,
                staged_chunks=n if staged is None else min(n, staged), keep=keep)


def _main(argv=None) -> int:
    p = OneLineParser(prog=PROG, description=doc_summary(__doc__))
    p.add_argument("--checkpoint", default="assets/tiny-pretrained")
    p.add_argument("--chunks", type=int_list(1), default="4,8,16,32")
    p.add_argument("--resident", type=positive_int, default=2)
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--sink", type=nonneg_int, default=None)
    p.add_argument("--window", type=nonneg_int, default=None)
    p.add_argument("--steps", type=positive_int, default=4)
    p.add_argument("--device", type=device_name, default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    check_out("--out", args.out)
    check_checkpoint("--checkpoint", args.checkpoint)
    check_device("--device", args.device)
    try:
        pipe = Pipeline.from_pretrained(args.checkpoint, device=args.device)
    except ValueError as e:
        raise BadInput(f"--checkpoint {args.checkpoint}: {e}") from None
    try:  # the routing flags against the checkpoint's config, before the first rollout
        spec = pipe.sampling_options(top_k=args.top_k, sink=args.sink, window=args.window, steps=args.steps,
                                     kv_resident_chunks=args.resident).routing
    except ValueError as e:
        raise BadInput(f"--top-k/--sink/--window/--steps/--resident: {e}") from None
    # untimed warm-up: otherwise the first timed generate pays the process's first forward (on CUDA: the
    # context, cuBLAS handles and workspaces, kernel loads). Bounded, with one chunk spilled to the host
    # tier, so the pinned host copies are warm too.
    with Stopwatch(args.device) as sw:
        pipe.generate("a red circle bouncing", args.resident + 2, seed=0, steps=args.steps, top_k=args.top_k,
                      sink=args.sink, window=args.window, kv_resident_chunks=args.resident, decode=False)
    print(f"warm-up ({args.resident + 2} chunks, untimed): {sw.seconds:.3f}s", flush=True)
    KVCache.for_model = classmethod(_spy)
    rows = []
    for n in [int(x) for x in args.chunks.split(",")]:
        res = {}
        for r in (None, args.resident):
            with Stopwatch(args.device) as sw:
                out = pipe.generate("a red circle bouncing", n, seed=0, steps=args.steps, top_k=args.top_k,
                                    sink=args.sink, window=args.window, kv_resident_chunks=r, decode=False)
            res[r] = (out, sw.seconds)
        (a, ta), (b, tb) = res[None], res[args.resident]
        tier = _MADE[-1]  # the bounded run's cache: chunks copied in from the host, most staged at once
        row = dict(chunks=n, all_device_mib=a.timings["kv_cache_mib"], bounded_device_mib=b.timings["kv_cache_mib"],
                   bounded_total_mib=b.timings["kv_cache_total_mib"], all_s=ta, bounded_s=tb,
                   host_reads=tier.host_reads, staged_peak=tier.stage_k.shape[2] // tier.chunk_tokens - 1,
                   identical=bool(torch.equal(a.latents, b.latents)))
        rows.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    wan = wan_arithmetic(resident=max(args.resident, 1))
    print("wan2.1-1.3b 480p, 1 min, dense:", {k: round(v, 1) if isinstance(v, float) else v for k, v in wan.items()})
    if spec is not None and not spec.is_dense:
        floor = spec.max_selected()
        wan_routed = wan_arithmetic(resident=max(args.resident, 1), staged=floor,
                                    keep=window_reads(spec, None, Config().model.num_layers))
        wan = dict(dense=wan, routed=wan_routed, routing=str(spec))
        print(f"wan2.1-1.3b 480p, 1 min, {spec.mode} ({floor} staged chunks, its floor):",
              {k: round(v, 1) if isinstance(v, float) else v for k, v in wan_routed.items()})
    if args.out:
        atomic_write_json(args.out, dict(rows=rows, wan=wan, resident=args.resident, top_k=args.top_k,
                                         sink=args.sink, window=args.window, device=args.device))
    return 0


def main(argv=None) -> int:
    return run_main(_main, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
