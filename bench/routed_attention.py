#!/usr/bin/env python
"""Time one routed attention call against dense SDPA at real shapes (CPU or CUDA).

    python bench/routed_attention.py --threads 1                                   # CPU, defaults below
    python bench/routed_attention.py --pattern coherent --tokens 1560 --history 10,40 --k 5 --threads 1
    python bench/routed_attention.py --device cuda --dtype bf16 --heads 12 --tokens 4680

One layer's attention of the current chunk (queries = one chunk of `--tokens` tokens, `--heads` heads x
`--head-dim`, batch 1) over `--history` finished chunks plus itself:
  dense   F.scaled_dot_product_attention over [all history | current chunk] (what routing replaces);
  routed  select_chunks(q, mean_k, RoutingSpec("topk", top_k=k)) + routed_attention (the library's
          inference path: backend "auto" = torch on CPU, the Triton kernel on CUDA; chunk means are
          cached by the KV cache, so they are computed outside the timed region).
Dense and routed calls are INTERLEAVED: each round times, for every history length, one dense call
then every routed case of that length (`--repeats` rounds after one warm-up round of the routed cases;
the median is reported), so that load from other processes hits dense and routed, and short and long
histories, alike. All inputs of one `--tokens` value are held at once.

Selection patterns (`--pattern`, comma list), made by the queries and keys, not by editing `sel`:
  random    i.i.d. q and k: every token picks its own k chunks (what random weights do);
  coherent  "sink + recent" (the pattern trained models learn, method.md section 6): the first chunk and
            the k-1 most recent carry a shared key direction the queries share, so almost every token
            (`coh` column: the fraction whose selection equals the head's most common one) picks them
            (`--gap 3.5`: 99.3-99.8%; the issue's measurement had 99.7%; a lower gap makes more outliers);
  mixed     half the heads coherent, half random.
The table: dense s, routed s, speed-up = dense / routed, ideal = (N+1)/(k+1) (attended keys, dense /
routed), fraction = speed-up / ideal, and the plan the torch path chose (`routing.last_plan_summary`), or
"triton" where the Triton kernel ran instead (`routing.last_routed_path`: CUDA, backend auto or triton).
Inputs: one set of i.i.d. normal draws per history length, made on the target device (seeded there);
every pattern and k of that length starts from it (the coherent heads' q and keys are shifted copies).

`--cpu-kernels auto,fused` times every routed case twice in the same rounds (an A/B in one process):
"auto" is the library's rule (per-chunk groups of 33-191 query rows over chunks whose K and V reach 2 MiB
as in-place matrix products), "fused" sends every problem to torch's fused CPU kernel (what the torch path
did before that rule).
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import (wan13b_shape, OneLineParser, doc_summary, DTYPE_NAMES, BadInput, add_attention_shape_args, check_out,  # noqa: E402
                          choice_list, device_name, finite_float, int_list, nonneg_int, positive_int, run_main,
                          setup_device)
from resampling_forcing.attention import routed_torch  # noqa: E402
from resampling_forcing.attention import routing as R  # noqa: E402
from resampling_forcing.attention.backends import ROUTING_PATHS, use_routing_kernels  # noqa: E402
from resampling_forcing.attention.routing import RoutingSpec, chunk_means, routed_attention, select_chunks  # noqa: E402
from resampling_forcing.io import atomic_write_json  # noqa: E402
from resampling_forcing.timing import Stopwatch  # noqa: E402

PROG = "bench/routed_attention.py"
PATTERNS = ("random", "coherent", "mixed")
CPU_KERNELS = ("auto", "fused")


def draw_base(Hh, N, T, D, device, seed=0):
    """The i.i.d. N(0, 1) draws (fp32) that every pattern and k of one history length starts from:
    q [1,Hh,T,D], history k/v [1,Hh,N*T,D], current k/v [1,Hh,T,D]. Drawn ONCE per history length, on
    `device` with a generator seeded there (on CPU the same values as one CPU generator; for the GPU
    shapes, up to ~6e8 normals per length, the GPU draws in milliseconds what took the CPU 20-60 s a run)."""
    g = torch.Generator(device=device).manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    return rn(1, Hh, T, D), rn(1, Hh, N * T, D), rn(1, Hh, N * T, D), rn(1, Hh, T, D), rn(1, Hh, T, D)


def make_inputs(base, k, pattern, dtype, gap=3.5, cast=None):
    """One case's (q, kh, vh, kc, vc) in `dtype` from `base` (draw_base, fp32) for one selection pattern.
    Only the coherent heads' q and history keys change, so only q and kh are cloned; the rest (and
    everything for "random") are the shared `cast` tensors: base in `dtype`, made here when not given."""
    cast = cast or [t.to(dtype).contiguous() for t in base]
    q, kh = base[0], base[1]
    Hh, T, D = q.shape[1], q.shape[2], q.shape[3]
    N = kh.shape[2] // T
    if not (pattern in ("coherent", "mixed") and N > k):
        return list(cast)
    q, kh = q.clone(), kh.clone()
    heads = range(Hh) if pattern == "coherent" else range(0, Hh, 2)
    pref = [0] + list(range(N - (k - 1), N)) if k > 1 else [0]  # sink + the k-1 most recent
    u = torch.zeros(D, device=q.device)
    u[0] = 1.0
    # mean key of a preferred chunk is +a*u, of the others ~0 (noise of norm sqrt(D/T)); queries carry
    # +c*u, so a token's preferred scores lead by a*c = 3 against a per-token noise of std ~1 (its own
    # component along u): with c = 3.5, 99.3-99.8% of the tokens pick exactly the preferred chunks
    a, c = 1.0, gap
    for h in heads:
        kh[0, h].view(N, T, D)[pref] += a * u
        q[0, h] += c * u
    return [q.to(dtype).contiguous(), kh.to(dtype).contiguous(), *cast[2:]]


def coherence(sel):
    """Fraction of tokens whose selection equals their head's most common selection (mean over heads)."""
    fr = []
    for row in sel.flatten(0, 1):
        _, counts = torch.unique(row, dim=0, return_counts=True)
        fr.append(float(counts.max()) / row.shape[0])
    return sum(fr) / len(fr)


def _main(argv=None) -> int:
    p = OneLineParser(prog=PROG, description=doc_summary(__doc__))
    p.add_argument("--device", type=device_name, default="cpu")
    p.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES)
    p.add_argument("--pattern", type=choice_list(PATTERNS), default="random,coherent,mixed",
                   help="comma list of random, coherent, mixed")
    p.add_argument("--tokens", type=int_list(1), default=str(wan13b_shape(1)[2]),
                   help="tokens per chunk (comma list; default one 480p latent frame of Wan2.1)")
    add_attention_shape_args(p, history_flag="--history", history="6,10,20,40", topk_flag="--k", heads=2)
    p.add_argument("--gap", type=finite_float, default=3.5,
                   help="coherent heads: score lead of the preferred chunks in units of the per-token noise")
    p.add_argument("--repeats", type=positive_int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--threads", type=nonneg_int, default=None, help="torch CPU threads")
    p.add_argument("--backend", default="auto", choices=ROUTING_PATHS,
                   help="routed_attention backend (auto, torch, triton)")
    p.add_argument("--cpu-kernels", type=choice_list(CPU_KERNELS), default="auto",
                   help="torch path on CPU: auto (the library's rule), fused (torch's fused kernel only); "
                        "a comma list times each, interleaved")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    check_out("--out", args.out)
    device, dtype = setup_device(args)
    try:  # triton needs the kernels and CUDA (or the interpreter): say so now, not after the first timings
        use_routing_kernels(args.backend, torch.empty(0, device=device, dtype=dtype), "--backend")
    except (ValueError, RuntimeError) as e:
        raise BadInput(str(e)) from None
    patterns = args.pattern.split(",")
    cpu_kernels = args.cpu_kernels.split(",")
    auto_rows = routed_torch._INPLACE_ROWS
    ks = [int(x) for x in args.k.split(",")]
    Hh, D = args.heads, args.head_dim
    rows, lines = [], []
    try:
        for T in (int(x) for x in args.tokens.split(",")):
            groups = []  # per history length: its cases and its dense baseline, all timed in the same rounds
            for N in (int(x) for x in args.history.split(",")):
                cases = []
                base = draw_base(Hh, N, T, D, device)
                cast = [t.to(dtype).contiguous() for t in base]
                for pat in patterns:
                    for k in ks:
                        ins = make_inputs(base, k, pat, dtype, gap=args.gap, cast=cast)
                        mean_k = chunk_means(ins[1], T)  # the KV cache keeps these per chunk
                        spec = RoutingSpec("topk", top_k=k)
                        for ck in cpu_kernels:
                            cases.append(dict(pattern=pat, k=k, ins=ins, mean_k=mean_k, spec=spec, times=[], cpu=ck))
                del base, cast  # the cases hold what they use
                q0, kh0, vh0, kc0, vc0 = cases[0]["ins"]
                groups.append(dict(N=N, cases=cases, q=q0, k=torch.cat([kh0, kc0], 2), v=torch.cat([vh0, vc0], 2),
                                   dense_times=[]))

            def routed(c, T=T):
                q, kh, vh, kc, vc = c["ins"]
                routed_torch._INPLACE_ROWS = auto_rows if c["cpu"] == "auto" else (0, 0)  # (0, 0): never
                sel = select_chunks(q, c["mean_k"], c["spec"])
                out = routed_attention(q, kh, vh, kc, vc, sel, T, backend=args.backend)
                c["sel"] = sel
                return out

            # every round times every history length (dense, then its routed cases), so that the host's
            # slow and fast phases hit all lengths alike: the chunk-40 / chunk-6 ratios compare like with like
            with torch.no_grad():
                for rep in range(args.repeats + 1):  # round 0 = warm-up of the routed calls (plans, allocator)
                    for g in groups:
                        if rep:
                            with Stopwatch(device) as sw:
                                F.scaled_dot_product_attention(g["q"], g["k"], g["v"])
                            g["dense_times"].append(sw.seconds)
                        for c in g["cases"]:
                            with Stopwatch(device) as sw:
                                routed(c)
                            if rep:
                                c["times"].append(sw.seconds)
                            if rep == 0:  # the torch path's plan, or "triton" when the kernel ran (the plan
                                # summary is the torch path's alone: after a kernel call it would be stale)
                                c["path"] = R.last_routed_path()
                                c["plan"] = "triton" if c["path"] == "triton" else R.last_plan_summary()
            for g in groups:
                N, dense_times = g["N"], g["dense_times"]
                td = statistics.median(dense_times)
                for c in g["cases"]:
                    tr = statistics.median(c["times"])
                    ideal = (N + 1) / (min(c["k"], N) + 1)
                    row = dict(tokens=T, history=N, pattern=c["pattern"], k=c["k"], cpu_kernels=c["cpu"],
                               dense_s=td, routed_s=tr,
                               speedup=td / tr, ideal=ideal, fraction=td / tr / ideal,
                               coherence=coherence(c["sel"].cpu()), path=c["path"], plan=c["plan"],
                               dense_all=dense_times, routed_all=c["times"])
                    rows.append(row)
                    line = (f"| {T} | {N} | {c['pattern']} | {c['k']} | {c['cpu']} | {row['coherence']:.3f} | {td:.3f} "
                            f"| {tr:.3f} | {row['speedup']:.2f} | {ideal:.2f} | {row['fraction']:.2f} | {row['plan']} |")
                    lines.append(line)
                    print(line, file=sys.stderr, flush=True)
            del groups
    finally:  # the library's own rule again, whatever ran last
        routed_torch._INPLACE_ROWS = auto_rows

    head = [
        f"One attention call: batch 1, {Hh} heads x {D}, queries = one chunk, {args.dtype}, {device} "
        f"({torch.get_num_threads()} threads), backend {args.backend}, median of {args.repeats} interleaved rounds.",
        "",
        "| tokens/chunk | history N | pattern | k | cpu kernels | coh | dense (s) | routed (s) | speed-up "
        "| ideal (N+1)/(k+1) | fraction of ideal | plan |",
        "|" + "---|" * 12,
    ]
    table = "\n".join(head + lines)
    print(table)
    if args.out:
        meta = dict(command=" ".join(["python", "bench/routed_attention.py"] + (argv or sys.argv[1:])),
                    machine=dict(platform=platform.platform(), torch=torch.__version__,
                                 threads=torch.get_num_threads(), device=str(device), cpus=os.cpu_count()))
        atomic_write_json(args.out, dict(meta=meta, rows=rows, markdown=table))
    return 0


def main(argv=None) -> int:
    return run_main(_main, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
