"""The end of one optimizer step, where the processes and the loss scaler meet.

- `optimizer_step`: gradient norm (clipped or not), then the update, or no update when the norm is not
  finite. Under fp16 with a loss scaler (accelerate's GradScaler, DDP or one GPU) the scaler's own
  `step`/`update` must still run on such a step: they skip the update and lower the scale; skipping
  them leaves the scaler "unscaled" and the next step raises.
- `over_processes`: flags agreed over processes (skip a micro-batch, stop, reject a checkpoint).
- `step_metrics`: the step's logged numbers over all processes in one fixed-size gather. A process whose
  micro-batch lost a video found bad during training has fewer resampling times t_s than the others, so
  raw values cannot be gathered (NCCL needs equal sizes); each process sends [count, sum, sum of squares,
  min, max] instead.
- `write_rank_report`: a hash of each process's weights at the end, to check that the ranks agree.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

# per-process t_s statistics sent in the gather: count, sum, sum of squares, min, max
_TS_STATS = 5


def over_processes(acc, device, flags: Iterable[float], op: str) -> list[float]:
    """The min (`op` "min") or max of each flag over all processes, in one collective (none with one
    process): how the processes agree to skip a micro-batch, stop, or reject a checkpoint."""
    values = [float(f) for f in flags]
    if acc.num_processes == 1:
        return values
    import torch.distributed as dist

    x = torch.tensor(values, device=device, dtype=torch.float32)
    dist.all_reduce(x, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return x.tolist()


def optimizer_step(acc, optimizer, params: Iterable[torch.nn.Parameter], clip: float) -> float:
    """Norm of the accumulated gradients, then `optimizer.step()` when it is finite; grads are zeroed
    either way. `clip > 0`: clip to that global norm (the norm returned is the one before clipping).
    The norm is of the unscaled gradients also under an fp16 loss scaler (not DeepSpeed: its engine
    steps inside `accelerate.backward`)."""
    params = [p for p in params if p.grad is not None]
    if clip > 0:
        norm = float(acc.clip_grad_norm_(params, clip))  # unscales first under a loss scaler
    else:
        acc.unscale_gradients()  # a no-op without a loss scaler
        norm = float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params]))) if params else 0.0
    finite = bool(torch.isfinite(torch.tensor(norm)))
    if finite or getattr(acc, "scaler", None) is not None:
        # with a scaler and inf/nan grads, scaler.step skips the update and scaler.update lowers the scale
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def ts_stats(ts: list[torch.Tensor], device) -> torch.Tensor:
    """This process's t_s values (one tensor per micro-batch, any length, maybe none) ->
    [count, sum, sum of squares, min, max] in float64 (min/max of no value: +inf / -inf)."""
    if not ts:
        return torch.tensor([0.0, 0.0, 0.0, float("inf"), float("-inf")], dtype=torch.float64, device=device)
    x = torch.cat([t.reshape(-1) for t in ts]).to(device=device, dtype=torch.float64)
    return torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=device), x.sum(),
                        (x * x).sum(), x.min(), x.max()])


def merge_ts_stats(stats: torch.Tensor) -> Optional[dict]:
    """[P, 5] per-process `ts_stats` -> {t_s_mean, t_s_std (unbiased, 0 for one value), t_s_min, t_s_max},
    or None when no process had a t_s (teacher forcing)."""
    count, total, sq = stats[:, 0].sum(), stats[:, 1].sum(), stats[:, 2].sum()
    n = float(count)
    if n == 0:
        return None
    mean = float(total) / n
    var = max(float(sq) - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
    return {"t_s_mean": mean, "t_s_std": var ** 0.5, "t_s_min": float(stats[:, 3].min()),
            "t_s_max": float(stats[:, 4].max())}


def metrics_vector(losses: list[torch.Tensor], chunks: list[torch.Tensor], ts: list[torch.Tensor]) -> torch.Tensor:
    """This process's step: per-micro-batch losses (scalars), per-chunk losses ([N] each), t_s values ->
    the [1, 1 + N + 5] float64 vector it sends: mean loss, mean per-chunk loss, `ts_stats`."""
    loss = torch.stack(losses).double().mean()[None]
    chunk = torch.stack(chunks).double().mean(0)
    return torch.cat([loss.to(chunk.device), chunk, ts_stats(ts, chunk.device)])[None]


def reduce_metrics(vecs: torch.Tensor) -> dict:
    """[P, 1 + N + 5] vectors of all processes -> {loss, loss_chunk (averaged over processes), t_s_* (of
    all values, when any)}."""
    n = vecs.shape[1] - 1 - _TS_STATS
    rec = {"loss": float(vecs[:, 0].mean()), "loss_chunk": [float(x) for x in vecs[:, 1:1 + n].mean(0)]}
    rec.update(merge_ts_stats(vecs[:, 1 + n:]) or {})
    return rec


def step_metrics(acc, losses: list[torch.Tensor], chunks: list[torch.Tensor], ts: list[torch.Tensor]) -> dict:
    """The step's metrics over processes (`metrics_vector`, one gather, `reduce_metrics`); a collective:
    every process calls it."""
    vec = metrics_vector(losses, chunks, ts)
    return reduce_metrics(acc.gather(vec) if acc.num_processes > 1 else vec)


def write_rank_report(folder, model: torch.nn.Module, acc, step: int, max_params: int = 50_000_000) -> None:
    """`folder`/rank_R.json: the step and a hash of this process's weights (multi-node checks); skipped
    for models above `max_params` (hashing them costs more than the check is worth)."""
    import hashlib
    from pathlib import Path

    from .io import atomic_write_json

    if sum(p.numel() for p in model.parameters()) > max_params:
        return
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(folder) / f"rank_{acc.process_index}.json",
                      {"rank": acc.process_index, "world_size": acc.num_processes, "step": step,
                       "weights_sha256": h.hexdigest()})
