"""Loading: a run dir / checkpoint dir / raw Wan checkpoint / cached Hub id -> Config, model and encoders.

What is loaded (docs/CONTRACTS.md, run-directory contract; the path is classified by
checkpoint.resolve_checkpoint):
- RUN dir (has checkpoints/): the newest complete `checkpoints/step_XXXXXXX/` (highest step whose
  name is final; temporary names are ignored).
- checkpoint dir (has model_config.json + model.safetensors): `ema.safetensors` when present
  (unless use_ema=False), else `model.safetensors`; the model sizes come from model_config.json. A LoRA
  checkpoint that keeps only its adapters (lora.safetensors): its base merged with them (their EMA when
  present, unless use_ema=False), lora.merged_weights.
  The Config comes from the checkpoint's `config.yaml`, else the run's `config.yaml`, else the
  `config` argument; `config` (a path or Config) and `overrides` ("key.path=value") are applied
  on top. The encoders are rebuilt from the config's `encoders` section.
- a raw Wan2.1 checkpoint (original or diffusers layout, models/loading.py): the model sizes come
  from its config.json; everything else from `config` (defaults otherwise). For a diffusers repo
  root with vae/ and text_encoder/, missing encoders.vae_path / text_path default to that root.
- a Hub id ("org/name") that is no local path: its snapshot in the local HF cache (offline).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ..attention.backends import resolve_backend
from ..checkpoint import LORA_WEIGHTS, CheckpointInfo, resolve_checkpoint
from ..config import WAN_VAES, Config, ConfigError, config_from_dict, load_config, to_dict
from ..encoders import build_text_encoder, build_vae
from ..models.loading import DTYPES, CheckpointError, config_from_checkpoint, load_state_into, read_state_dict
from ..models.wan import CausalWanModel
from ..storyboard import PipelineError

__all__ = ["parse_dtype", "resolve_device", "resolve_config", "load_pretrained"]

_DTYPES = {**DTYPES, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise PipelineError(f"dtype {dtype} is not supported; choose one of fp32, bf16, fp16")
        return dtype
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise PipelineError(f"dtype {dtype!r} is unknown; choose one of fp32, bf16, fp16")
    return _DTYPES[dtype]


def resolve_device(device: Union[str, torch.device, None], what: str = "device",
                   kinds: Sequence[str] = ("cpu", "cuda", "mps")) -> torch.device:
    """'auto' / None -> cuda if available else cpu. PipelineError (one line, naming `what`, e.g. a
    flag) for a name that is no torch device, a CUDA device that is not there, or a kind not in `kinds`."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise PipelineError(f"{what} {device}: not a torch device ({str(e).splitlines()[0]}); "
                            f"use {' or '.join(kinds)}") from None
    cpu = f"{what} cpu" if what.startswith("--") else f"{what}='cpu'"  # a flag, or an argument of the API
    if dev.type == "cuda" and "cuda" in kinds:
        if not torch.cuda.is_available():
            raise PipelineError(f"{what} {device}: CUDA is not available on this machine; use {cpu}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PipelineError(f"{what} {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and "mps" in kinds:
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise PipelineError(f"{what} {device}: MPS (Apple GPU) is not available on this machine; use {cpu}")
    elif dev.type not in kinds:
        raise PipelineError(f"{what} {device}: only {', '.join('cuda[:N]' if k == 'cuda' else k for k in kinds)} "
                            f"are supported")
    return dev


# ----------------------------------------------------------------------------- config


def resolve_config(path: Union[str, Path], *, config: Union[str, Path, Config, None] = None,
                   overrides: Sequence[str] = (), use_ema: bool = True) -> Config:
    """The Config that `Pipeline.from_pretrained` would use (model sizes from the checkpoint),
    without loading any weights or encoders: for up-front checks such as memory estimates."""
    return _config_for(resolve_checkpoint(path, use_ema=use_ema), config, overrides)


def _config_for(info: CheckpointInfo, config, overrides: Sequence[str]) -> Config:
    """The config of a resolved checkpoint: its config.yaml (see _load_config), the model sizes from
    the checkpoint, and for a raw Wan checkpoint the encoder paths of its diffusers repo root."""
    cfg = _load_config(info, config, overrides)
    try:
        model_cfg = config_from_checkpoint(info.model_dir, base=cfg.model)
    except CheckpointError as e:
        raise PipelineError(str(e)) from None
    except (KeyError, ValueError, TypeError) as e:
        raise PipelineError(f"{info.model_dir}: unreadable model config ({type(e).__name__}: {e})") from None
    cfg = dataclasses.replace(cfg, model=model_cfg)
    return _wan_encoder_defaults(cfg, info.model_dir) if info.kind == "wan" else cfg


def _load_config(info: CheckpointInfo, config, overrides: Sequence[str]) -> Config:
    """The checkpoint's (or run's) config.yaml, then `config` (a Config replaces it; a YAML path is
    merged on top, key by key), then `overrides`."""
    if info.config_path is None and info.kind != "wan" and config is None:  # defaults would misname the cause
        raise PipelineError(f"checkpoint {info.model_dir} has no config.yaml (nor has its run): the encoders and "
                            "sampling settings are unknown; copy the run's config.yaml next to it or pass --config")
    try:
        base: dict = to_dict(load_config(info.config_path)) if info.config_path is not None else {}
        if isinstance(config, Config):
            base = to_dict(config)
        elif config is not None:
            load_config(config)  # validate the file on its own first (its one-line errors: missing, a folder, YAML)
            _deep_update(base, _explicit(config))
        if isinstance(base.get("model"), dict) and info.config_path is not None:
            base["model"].pop("preset", None)  # sizes are explicit (and come from the checkpoint anyway)
        return config_from_dict(base, overrides)
    except ConfigError as e:
        raise PipelineError(str(e)) from None


def _explicit(path) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text()) or {}


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def _wan_encoder_defaults(cfg: Config, model_dir: Path) -> Config:
    """A diffusers repo root next to transformer/ usually holds vae/ and text_encoder/ too."""
    root = model_dir.parent if model_dir.name == "transformer" else model_dir
    enc = cfg.encoders
    changes = {}
    if enc.vae in WAN_VAES and not enc.vae_path and (root / "vae" / "config.json").is_file():
        changes["vae_path"] = str(root)
    if enc.text == "umt5" and not enc.text_path and (root / "text_encoder" / "config.json").is_file():
        changes["text_path"] = str(root)
    return dataclasses.replace(cfg, encoders=dataclasses.replace(enc, **changes)) if changes else cfg


# ----------------------------------------------------------------------------- weights and encoders


def check_model_overrides(cfg: Config, overrides: Sequence[str]) -> None:
    """An override `model.KEY=VALUE` that the checkpoint overrules (our checkpoints fix every model key
    in model_config.json, a raw Wan2.1 checkpoint its sizes) would be ignored silently: PipelineError."""
    import typing

    from ..typed_yaml import ConfigError, coerce, override_value

    hints = typing.get_type_hints(type(cfg.model))
    for text in overrides:
        keys, want = override_value(text)
        if len(keys) != 2 or keys[0] != "model" or not hasattr(cfg.model, keys[1]):
            continue
        try:  # as the config reads it (1e-6 is a float there, a string to YAML)
            want = coerce(want, hints[keys[1]], text)
        except (ConfigError, KeyError):
            pass
        got = getattr(cfg.model, keys[1])
        if got != want and not (isinstance(got, str) and str(want) == got):
            raise PipelineError(f"{text}: the checkpoint fixes model.{keys[1]} = {got!r} (its model config); "
                                "it cannot be changed at sampling")


def load_pretrained(path: Union[str, Path], *, config: Union[str, Path, Config, None] = None,
                    overrides: Sequence[str] = (), device: Union[str, torch.device, None] = "cpu",
                    dtype: Union[str, torch.dtype] = "fp32", use_ema: bool = True,
                    attention_backend: Optional[str] = None, lora=None, lora_scale=None,
                    ) -> tuple[CausalWanModel, Any, Any, Config, torch.device, torch.dtype, dict]:
    """(model, vae, text_encoder, config, device, dtype, source): what `Pipeline.from_pretrained`
    holds (see the module doc); `source` describes what was loaded. `lora`: one or a list of LoRAs to merge,
    in order, into the checkpoint's model weights (not its EMA: the base a LoRA run trains on): a LoRA run's
    lora.safetensors, or its run / checkpoint folder (their EMA when `use_ema` and the file has one), or
    another tool's Wan2.1 LoRA file (lora_formats); `lora_scale`: their strength (one for all or one each;
    default 1). `source["lora"]`: a list, one record per LoRA. PipelineError (one line)."""
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise PipelineError(f"path: a run folder, a checkpoint folder or a Hugging Face id (str or Path), got {path!r}")
    if config is not None and not isinstance(config, (str, Path, Config)):
        raise PipelineError(f"config: a YAML path or a Config, got {type(config).__name__}")
    if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
        raise PipelineError(f"overrides: a list of 'key.path=value' strings, got {overrides!r:.80}")
    if not isinstance(use_ema, bool):
        raise PipelineError(f"use_ema must be True or False, got {use_ema!r}")
    from ..lora_formats import is_toolkit_file, lora_list

    try:
        loras = lora_list(lora, lora_scale)
        runs = any(is_toolkit_file(p) for p, _ in loras)
    except (ValueError, CheckpointError) as e:
        raise PipelineError(f"lora: {str(e).splitlines()[0]}") from None
    dev, dt = resolve_device(device), parse_dtype(dtype)
    # with a LoRA run's adapters: the checkpoint's model weights, the base such a run reads (use_ema picks the
    # adapters' EMA); other tools' LoRAs go onto the weights sampling would load anyway (EMA when there)
    info = resolve_checkpoint(path, use_ema=use_ema and not runs)
    overrides = list(overrides)
    if attention_backend is not None:
        overrides.append(f"attention.backend={attention_backend}")
    cfg = _config_for(info, config, overrides)
    check_model_overrides(cfg, overrides)
    try:
        backend = resolve_backend(cfg.attention.backend, dev)
    except ValueError as e:
        raise PipelineError(str(e)) from None
    model, applied = _load_model(info, cfg, dev, dt, loras, use_ema)
    try:
        vae = build_vae(cfg.encoders, device=dev, dtype=torch.float32)
        text = build_text_encoder(cfg.encoders, device=dev)
    except (ValueError, OSError) as e:  # EncoderLoadError, missing paths, unknown kinds
        raise PipelineError(f"encoders: {str(e).strip().splitlines()[0]}") from None
    source = dict(kind=info.kind, path=str(info.path), model_dir=str(info.model_dir),
                  weights=str(info.weights) if info.weights else str(info.model_dir), ema=info.ema,
                  step=info.step, config=str(info.config_path) if info.config_path else None,
                  attention_backend=backend)
    if applied is not None:
        source["lora"] = applied
    return model, vae, text, cfg, dev, dt, source


def _load_model(info: CheckpointInfo, cfg: Config, device: torch.device, dtype: torch.dtype,
                loras: Sequence[tuple[str, float]] = (), use_ema: bool = True) -> tuple[CausalWanModel, Optional[list]]:
    # Built without initialising (meta device, then uninitialised memory in the final dtype):
    # every parameter is overwritten by the strict load below.
    with torch.device("meta"):
        model = CausalWanModel(cfg.model).to(dtype=dtype)
    model = model.to_empty(device=device)
    if info.weights is not None and info.weights.name == LORA_WEIGHTS:  # a LoRA checkpoint keeping only adapters
        from ..lora import merged_weights

        try:
            state = merged_weights(info.model_dir, use_ema=info.ema)
        except CheckpointError as e:
            raise PipelineError(str(e).splitlines()[0]) from None
    elif info.weights is not None:
        from safetensors.torch import load_file

        try:
            state = load_file(str(info.weights))
        except Exception as e:  # truncated / not safetensors
            raise PipelineError(f"cannot read {info.weights}: {str(e).splitlines()[0]}") from None
    else:
        state = read_state_dict(info.model_dir)
    applied = None
    if loras:
        applied = []
        for i, (lora, strength) in enumerate(loras):
            state, done = _merge_lora(state, lora, strength, info, use_ema, first=i == 0)
            applied.append(done)
    load_state_into(model, state, source=str(info.weights or info.model_dir))
    del state
    return model.eval().requires_grad_(False), applied


def _merge_lora(state: dict, lora: str, strength: float, info: CheckpointInfo, use_ema: bool,
                first: bool = True) -> tuple[dict, dict]:
    """One LoRA merged into `state`: this toolkit's adapters (lora.merge_file), with the checks a user needs
    (the LoRA run's own checkpoint already holds them: PipelineError; another base is only warned about), or
    another tool's file (lora_formats.merge_updates)."""
    import logging

    from ..lora import adapter_file, merge_file
    from ..lora_formats import is_toolkit_file, merge_updates

    try:
        if not is_toolkit_file(lora):
            return merge_updates(state, lora, strength)
        file = adapter_file(lora)
        if (info.model_dir / LORA_WEIGHTS).is_file() and (info.model_dir / LORA_WEIGHTS).samefile(file):
            raise PipelineError(f"lora: {lora} is the LoRA of the checkpoint being loaded, whose weights already "
                                "include it; leave it out (or load its base checkpoint with it)")
        identity = None  # state is still the checkpoint's own weights (first) and those keep only adapters
        if first and info.weights is not None and info.weights.name == LORA_WEIGHTS:
            from ..lora import weights_identity

            identity = weights_identity(info.model_dir)
        state, applied = merge_file(state, file, use_ema=use_ema, strength=strength, identity=identity)
    except CheckpointError as e:
        raise PipelineError(f"lora: {str(e).splitlines()[0]}") from None
    if not applied["base_matches"]:
        logging.getLogger(__name__).warning(
            "the adapters of %s were trained on other weights than %s: applying them anyway", file, info.model_dir)
    return state, applied
