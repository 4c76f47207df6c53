"""How a rollout samples: `SamplingOptions`, built once from a Config plus per-call overrides.

`SamplingOptions.from_config(cfg, device, **overrides)` is the one place where the sampling keys of
a config (`diffusion.sample_steps` / `sample_shift` / `cfg_scale` / `context_t`, `attention.*`) and a
call's overrides (the sample CLI's flags, `Pipeline.generate` / `__call__` arguments, the notebook)
become the options a rollout takes. Routing overrides go through `config.RoutingConfig`
(`dataclasses.replace(cfg.attention.routing, ...)`), so they are checked by the one routing
validation (`attention.spec.RoutingSpec`) with errors naming `attention.routing.*`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

from .attention.spec import BACKENDS, RoutingSpec, check_rope_horizon, routing_layers_problem, routing_spec
from .config import DiffusionConfig
from .config_checks import check_sampling
from .models.loading import DTYPES

__all__ = ["SamplingOptions", "KV_HOST_DTYPES"]

# dtypes of the host tier of a bounded KV cache (cache.TieredKVCache), by name.
KV_HOST_DTYPES = DTYPES


def training_horizon(cfg) -> int:
    """The longest query-to-key distance (chunks) a training clip of `cfg` shows: its latent chunks - 1."""
    from .memory import codec_geometry, latent_frames

    return max(1, latent_frames(codec_geometry(cfg), cfg.data.num_frames) // cfg.model.chunk_frames - 1)


@dataclass
class SamplingOptions:
    """How a rollout samples: the resolved runtime form of the sampling keys of config.DiffusionConfig
    and config.AttentionConfig. Defaults are DiffusionConfig's (the paper's: 32 Euler steps, shift 5, CFG 5)."""

    steps: int = DiffusionConfig.sample_steps
    shift: float = DiffusionConfig.sample_shift
    cfg_scale: float = DiffusionConfig.cfg_scale
    context_t: float = DiffusionConfig.context_t
    routing: Optional[RoutingSpec] = None  # None or mode dense = dense attention over all history
    routing_layers: Optional[list[int]] = None  # blocks that route (None = all)
    # attention backend (attention.spec.BACKENDS), resolved once for the model's device by the rollout
    # (attention.backends.resolve_backend); None = "auto", as the config's default
    backend: Optional[str] = None
    record_selection: bool = False
    # Bounded memory: at most this many finished chunks' K/V stay on the device, older ones go to
    # host memory (cache.TieredKVCache; outputs bit-identical). None = all resident.
    kv_resident_chunks: Optional[int] = None
    # dtype of the host tier ("bf16" | "fp16" | "fp32"; None = the model's): smaller is lossy.
    kv_host_dtype: Optional[str] = None
    # Far history read at this many chunks back (attention/positions.py); None = absolute positions.
    rope_horizon: Optional[int] = None
    rope_far_at: Optional[int] = None  # ... and read at this many chunks back (None = at the horizon)

    def __post_init__(self) -> None:
        # The runtime check of every field: options are also built directly (tests, bench), not
        # only from a validated config.
        check_sampling(self.steps, self.shift, self.cfg_scale, self.context_t)
        r = self.kv_resident_chunks
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueError(f"kv_resident_chunks must be >= 1 (got {r!r}); omit it (None) to keep the whole "
                             f"cache on the device")
        if self.kv_host_dtype is not None and self.kv_host_dtype not in KV_HOST_DTYPES:
            raise ValueError(f"kv_host_dtype must be one of {', '.join(KV_HOST_DTYPES)} (got {self.kv_host_dtype!r})")
        if self.kv_host_dtype is not None and self.kv_resident_chunks is None:
            raise ValueError("kv_host_dtype needs kv_resident_chunks N (it is the dtype of the host tier)")
        check_rope_horizon(self.rope_horizon, self.rope_far_at)
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is unknown; choose one of {list(BACKENDS)} (None: auto)")
        if self.routing is not None and not isinstance(self.routing, RoutingSpec):
            raise TypeError(f"routing must be a RoutingSpec or None, got {type(self.routing).__name__}")
        if not isinstance(self.record_selection, bool):
            raise TypeError(f"record_selection must be True or False, got {self.record_selection!r}")
        problem = routing_layers_problem(self.routing_layers)
        if problem:
            raise ValueError(f"routing_layers={self.routing_layers!r}: {problem}")

    @property
    def uses_routing(self) -> bool:
        return self.routing is not None and not self.routing.is_dense

    @classmethod
    def from_config(cls, cfg, device="cpu", *, routing: Union[RoutingSpec, str, None] = None,
                    top_k: Optional[int] = None, sink: Optional[int] = None, window: Optional[int] = None,
                    backend: Optional[str] = None, **overrides) -> "SamplingOptions":
        """Options from a resolved `Config` (diffusion.* sampling keys, attention.*), then the
        overrides that are not None (steps, shift, cfg_scale, context_t, record_selection,
        kv_resident_chunks, kv_host_dtype, rope_horizon (an int or "train" = a training clip's chunks
        - 1), rope_far_at; `backend` a resolved name, default the config's attention.backend resolved
        for `device`).

        Routing: `routing` a RoutingSpec (used as given) or a mode name (attention.spec.ROUTING_MODES);
        without a mode, `top_k` alone switches to topk and `window`/`sink` alone switch a dense
        config to the sliding-window baseline (a topk config keeps topk and gets sink/window).
        ValueError (one line) for a bad value."""
        d, rc = cfg.diffusion, cfg.attention.routing
        mode_given = routing.mode if isinstance(routing, RoutingSpec) else routing
        for name, value in (("top_k", top_k), ("sink", sink), ("window", window)):
            if value is not None and (isinstance(routing, RoutingSpec) or mode_given == "dense"
                                      or (mode_given == "window" and name == "top_k")):
                raise ValueError(f"routing={mode_given!r} contradicts {name}={value!r} "
                                 f"({'a RoutingSpec is used as given' if isinstance(routing, RoutingSpec) else 'drop one'})")
        problem = routing_layers_problem(overrides.get("routing_layers"), cfg.model.num_layers)
        if problem:
            raise ValueError(f"routing_layers={overrides['routing_layers']!r}: {problem}")
        if isinstance(routing, RoutingSpec):
            spec = routing
        else:
            mode = routing
            if mode is None:
                mode = "topk" if top_k is not None else rc.mode
                if mode == "dense" and (window or sink):
                    mode = "window"
            # RoutingConfig validates itself: errors name attention.routing.*
            spec = routing_spec(dataclasses.replace(
                rc, mode=mode, top_k=(rc.top_k if top_k is None else top_k) if mode == "topk" else None,
                sink_chunks=rc.sink_chunks if sink is None else sink,
                window_chunks=rc.window_chunks if window is None else window))
        if backend is None:
            from .attention.backends import resolve_backend

            backend = resolve_backend(cfg.attention.backend, device)
        values = dict(steps=d.sample_steps, shift=d.sample_shift, cfg_scale=d.cfg_scale, context_t=d.context_t,
                      routing=spec, routing_layers=rc.layers, backend=backend, record_selection=rc.record,
                      rope_horizon=cfg.attention.rope_horizon, rope_far_at=cfg.attention.rope_far_at)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["rope_horizon"] == "train":
            values["rope_horizon"] = training_horizon(cfg)
        return cls(**values)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["routing"] = (dataclasses.asdict(self.routing) if self.routing is not None
                          else {"mode": "dense", "top_k": None, "sink_chunks": 0, "window_chunks": 0})
        return out
