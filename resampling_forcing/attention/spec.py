"""What attention can be asked for, as data (torch-free): the backend names, the routing modes and
`RoutingSpec`.

The one declaration of the routing modes and of their rules. `config.RoutingConfig` extends
`RoutingSpec` (so a config is checked by the same `__post_init__`, with errors that name the key
path), and `routing_spec(cfg)` is the one conversion from config to the spec the attention code takes.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

# Attention backends (config attention.backend); attention/backends.py resolves and dispatches them.
AttentionBackend = Literal["auto", "sdpa", "flex", "triton", "xformers"]
BACKENDS: tuple[str, ...] = typing.get_args(AttentionBackend)

RoutingMode = Literal["dense", "topk", "window"]
ROUTING_MODES: tuple[str, ...] = typing.get_args(RoutingMode)


@dataclass
class RoutingSpec:
    """Which history chunks a query token attends (config `attention.routing`).

    mode: "dense" (all history), "topk" (sink U window U top_k of the rest by q . mean(K_j)),
          "window" (sink U window: the sliding-window baseline, no scores).
    top_k: number of scored chunks kept in topk mode (>= 1). Ignored by dense/window.
    sink_chunks: first n (allowed) history chunks always kept. Ignored by dense.
    window_chunks: last n (allowed) history chunks always kept. Ignored by dense.
    """

    # How errors name a field: "RoutingSpec.top_k" here, the config key path in config.RoutingConfig.
    field_prefix: ClassVar[str] = "RoutingSpec."

    mode: RoutingMode = "dense"
    top_k: Optional[int] = None
    sink_chunks: int = 0
    window_chunks: int = 0

    def __post_init__(self) -> None:
        p = self.field_prefix
        if self.mode not in ROUTING_MODES:
            raise ValueError(
                f"{p}mode must be one of {list(ROUTING_MODES)}, got {self.mode!r}; "
                "use 'dense' for full attention, 'topk' for routing, 'window' for the sliding-window baseline"
            )
        for name in ("sink_chunks", "window_chunks"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ValueError(f"{p}{name} must be an int >= 0, got {val!r}; set it to 0 to disable")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)):
            raise ValueError(f"{p}top_k must be an int or None, got {self.top_k!r}")
        if self.mode == "topk" and (self.top_k is None or self.top_k < 1):
            raise ValueError(
                f"{p}top_k must be >= 1 when mode='topk', got {self.top_k!r}; "
                "set top_k (the paper uses 5), or use mode='dense'"
            )
        if self.mode == "window" and self.sink_chunks + self.window_chunks < 1:
            raise ValueError(
                f"{p}window_chunks (or sink_chunks) must be >= 1 when mode='window' "
                "(otherwise no history is attended); set window_chunks, e.g. 1"
            )

    @property
    def is_dense(self) -> bool:
        return self.mode == "dense"

    def max_selected(self) -> int | None:
        """Most history chunks a query can attend (None = unbounded, dense)."""
        if self.mode == "dense":
            return None
        extra = self.top_k if self.mode == "topk" else 0
        return self.sink_chunks + self.window_chunks + int(extra or 0)


def routing_spec(cfg: RoutingSpec | None) -> RoutingSpec | None:
    """The spec the attention code takes, from config (`attention.routing`) or a spec; None for dense.
    The one conversion from config (options.SamplingOptions.from_config and the Trainer call it)."""
    if cfg is None or cfg.mode == "dense":
        return None
    return RoutingSpec(cfg.mode, cfg.top_k, cfg.sink_chunks, cfg.window_chunks)


def routing_layers_problem(layers, num_layers: int | None = None) -> str | None:
    """Why `layers` cannot name the blocks that route, or None: a non-empty list of distinct block indices
    in [0, num_layers) (None = every block). `num_layers` None checks the form only (options built before
    a model is known: the Rollout checks the depth). The one rule of attention.routing.layers,
    SamplingOptions.routing_layers and the Rollout."""
    if layers is None:
        return None
    top = "" if num_layers is None else f", < {num_layers} (the model's blocks)"
    if (not isinstance(layers, (list, tuple)) or not layers or len(set(layers)) != len(layers)
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers)
            or (num_layers is not None and max(layers) >= num_layers)):
        return f"must be a non-empty list of distinct block indices >= 0{top}, or null/None for every block"
    return None


def every_block_routes(routing_layers, num_layers: int) -> bool:
    """Whether routing applies to every one of `num_layers` blocks (`routing_layers` None = all; a list
    naming them all counts too)."""
    return routing_layers is None or set(range(num_layers)) <= set(routing_layers)


def window_reads(spec: RoutingSpec | None, routing_layers, num_layers: int) -> tuple[int, int] | None:
    """(sink, window) when every block reads only the first `sink` and the last `window` history chunks
    (window routing on all `num_layers` blocks; `routing_layers` None = all): the only chunks a bounded
    KV cache must keep (cache.TieredKVCache `keep`). None when some block reads more."""
    if spec is None or spec.mode != "window" or not every_block_routes(routing_layers, num_layers):
        return None
    return spec.sink_chunks, spec.window_chunks


def check_rope_horizon(horizon, far_at=None, names: tuple[str, str] = ("rope_horizon", "rope_far_at")) -> None:
    """The rules of the far-history positions (attention/positions.py), for their every spelling (config
    keys attention.rope_horizon / rope_far_at, SamplingOptions, the sample CLI): each None or an int >= 1
    (chunks); far_at only with a horizon."""
    for name, value, unset in ((names[0], horizon, "for absolute positions"),
                               (names[1], far_at, "to read at the horizon")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an int >= 1 (history chunks), got {value!r}; omit it (null) {unset}")
    if far_at is not None and horizon is None:
        raise ValueError(f"{names[1]} needs {names[0]} (which chunks are far); set both or neither")
