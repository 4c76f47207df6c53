#!/usr/bin/env python
"""How much attention a sink gets as a function of the distance it is read at (far-history positions).

    OMP_NUM_THREADS=1 python bench/sink_attention.py --checkpoint assets/ablation/ar_0.6 --clips 16 \\
        --chunk 40 --distances 1-20 --out outputs/bench/sink_attention.json

bench/rope_period.py measures object fidelity with the first chunk (a sink) read at D chunks back
(`rope_horizon=4, rope_far_at=D` under sink 1 + window 4). This is the mechanism behind that curve: the
held-out clips are continued from their first chunk with sink 1 + window 4 at absolute positions, and at
the last denoising step of chunk --chunk every layer's queries are taken as they are; for each D the
softmax over [sink read at D | window | current chunk] is recomputed from the same queries and keys
(a counterfactual on one state, not a rollout per D) and the share of attention on the sink tokens is
averaged over queries, heads, clips (and, in the table, layers). Also printed: the share at the sink's
true (absolute) distance. CPU, minutes.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BadInput, OneLineParser, doc_summary, check_checkpoint, check_out, positive_int, run_main  # noqa: E402


def _distances(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or int(lo) < 1 or (hi and int(hi) < int(lo)):
            raise BadInput(f"--distances {text!r}: comma list of chunk distances >= 1 or ranges like 1-20")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return sorted(set(out))


def _main(argv=None):
    p = OneLineParser(prog="bench/sink_attention.py", description=doc_summary(__doc__))
    p.add_argument("--checkpoint", default="assets/ablation/ar_0.6")
    p.add_argument("--clips", type=positive_int, default=16)
    p.add_argument("--chunk", type=positive_int, default=40, help="generated chunk whose attention is probed")
    p.add_argument("--distances", default="1-20", help="read distances D in chunks: a comma list or ranges")
    p.add_argument("--window", type=positive_int, default=4)
    p.add_argument("--out", default=None, help="write the shares as JSON here")
    args = p.parse_args(argv)
    dists = _distances(args.distances)
    if args.chunk <= args.window + 1:
        raise BadInput(f"--chunk {args.chunk}: must exceed --window + 1 = {args.window + 1} (a far sink)")
    check_checkpoint("--checkpoint", args.checkpoint)
    check_out("--out", args.out, (".json",))
    import torch

    from resampling_forcing.ablation_eval import eval_clips
    from resampling_forcing.attention.positions import FarPositions
    from resampling_forcing.attention.spec import RoutingSpec
    from resampling_forcing.io import atomic_write_json
    from resampling_forcing.pipeline import Pipeline
    from resampling_forcing.sampler import sample

    pipe = Pipeline.from_pretrained(args.checkpoint, device="cpu")
    pipe.config.attention.rope_horizon = pipe.config.attention.rope_far_at = None  # the rollout at absolute positions
    cf = pipe.chunk_frames
    spec = RoutingSpec("window", sink_chunks=1, window_chunks=args.window)
    opts = pipe.sampling_options(routing=spec)
    clips = eval_clips(pipe.config.data, args.clips, pipe.vae.frames_for_latents(cf))
    history = torch.cat([pipe.load_init_video(v)[0] for v, _ in clips])
    ctx = pipe.encode_prompts([m["caption"] for _, m in clips])
    neg = pipe.encode_prompts([pipe.config.diffusion.negative_prompt]) if opts.cfg_scale != 1.0 else None
    # chunk index in the cache when the probed chunk is denoised: the given chunk + chunk - 1 generated ones
    probe_n, steps = args.chunk, opts.steps
    far = {d: FarPositions.for_model(pipe.model, args.window, d) for d in dists}
    shares: dict[int, list[float]] = {d: [] for d in dists}
    actual: list[float] = []
    calls = {}

    def share(q, keys_sink, rest_k):
        """Attention share [float] of the sink tokens: q [B, Hh, Lq, D], keys [B, Hh, L, D]."""
        b = q.shape[0] // 2 if neg is not None else q.shape[0]  # the conditional half under CFG
        logits = torch.einsum("bhqd,bhkd->bhqk", q[:b].float(), torch.cat([keys_sink, rest_k], dim=2)[:b].float())
        att = (logits / q.shape[-1] ** 0.5).softmax(dim=-1)
        return float(att[..., :keys_sink.shape[2]].sum(dim=-1).mean())

    def wrap(op):
        if op.commit:
            return op

        def probed(q, k, v, layer):
            n = op.cache.num_chunks
            calls[(n, layer)] = calls.get((n, layer), 0) + 1
            if n == probe_n and calls[(n, layer)] == steps:  # the last denoising step of the probed chunk
                hk, _, _ = op.cache.history(layer)
                T_ = op.cache.chunk_tokens
                sink, window = hk[:, :, :T_], hk[:, :, (n - args.window) * T_:n * T_]
                rest = torch.cat([window, k], dim=2)
                actual.append(share(q, sink, rest))
                for d, pos in far.items():
                    shares[d].append(share(q, pos.keys(sink, T_, n, [0]), rest))
            return op(q, k, v, layer)
        return probed

    with torch.no_grad():
        sample(pipe.model, ctx, probe_n, pipe._geometry(None, None)[2], neg_context=neg, options=opts, seed=0,
               indices=list(range(len(clips))), history=history, decode=False, attn_wrapper=wrap)
    layers = pipe.model.cfg.num_layers
    if len(actual) != layers:
        raise RuntimeError(f"probed {len(actual)} layer calls, expected {layers}")
    rows = {d: sum(s) / layers for d, s in shares.items()}
    print(f"sink attention share at chunk {args.chunk} (sink 1 + window {args.window}, {args.clips} clips, mean over "
          f"{layers} layers); at its absolute distance {probe_n} chunks: {sum(actual) / layers:.4f}")
    print("| read at D chunks | sink share | per layer |\n|---|---|---|")
    for d in dists:
        print(f"| {d} | {rows[d]:.4f} | {' '.join(f'{x:.3f}' for x in shares[d])} |")
    if args.out:
        atomic_write_json(Path(args.out), {"args": vars(args), "absolute_distance": probe_n,
                                            "absolute_share": actual, "share": {str(d): shares[d] for d in dists}})
    return 0


def main(argv=None) -> int:
    return run_main(_main, "bench/sink_attention.py", argv)


if __name__ == "__main__":
    sys.exit(main())
