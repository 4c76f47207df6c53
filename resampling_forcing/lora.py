"""Low-rank adapters for fine-tuning a causal Wan DiT (train.lora, config.LoraConfig).

With `train.lora.rank > 0` the weights of `train.init_from` stay frozen and each targeted linear layer
learns W + (alpha / rank) B A (peft's LoRA layers; B starts at zero, so step 0 is the base model). The
optimizer, gradients and EMA then hold only A and B (a 14B model's adapters at rank 64: ~0.3B numbers).

What a checkpoint holds (file names: checkpoint.py):
- model.safetensors (and ema.safetensors): the MERGED weights under the plain model's names, so sampling,
  evaluation and a next stage's `train.init_from` read a LoRA run exactly as any other run;
- lora.safetensors: the adapters (and their EMA under "ema."), the training state a resume reads, with
  the base weights' fingerprint in its metadata: a resume reloads the base from `train.init_from` and
  refuses another one.

Shapes: a targeted layer's base weight W [out, in], A [rank, in], B [out, rank].
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .config import ConfigError, LoraConfig, ModelConfig
from .models.loading import CheckpointError

ADAPTER = "default"  # peft's adapter name: one adapter per model
_BASE, _A, _B = ".base_layer.", f".lora_A.{ADAPTER}.", f".lora_B.{ADAPTER}."
EMA_PREFIX = "ema."  # the EMA shadows of the adapters, in the same file


def enabled(cfg: LoraConfig) -> bool:
    return cfg.rank > 0


def scale(cfg: LoraConfig) -> float:
    """alpha / rank: what B A is multiplied by."""
    return (cfg.alpha if cfg.alpha is not None else cfg.rank) / cfg.rank


def _matches(name: str, target: str) -> bool:  # peft's rule for a target_modules entry
    return name == target or name.endswith("." + target)


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """ConfigError (one line) for a target naming no linear layer of `model`."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for t in targets:
        if not any(_matches(n, t) for n in linears):
            short = sorted({n.split(".", 2)[-1] if n.startswith("blocks.") else n for n in linears})
            raise ConfigError(f"train.lora.targets: {t!r} names no linear layer of the model; choose from {short}")


def check_model_targets(model_cfg: ModelConfig, targets: list[str]) -> None:
    """check_targets on a weightless (meta-device) model of `model_cfg`: before anything loads."""
    from .models.wan import CausalWanModel

    with torch.device("meta"):
        check_targets(CausalWanModel(model_cfg), targets)


def add_adapters(model: nn.Module, cfg: LoraConfig) -> None:
    """Wrap the target layers of `model` (in place) and freeze every other weight."""
    from peft import LoraConfig as PeftLora
    from peft import inject_adapter_in_model

    check_targets(model, cfg.targets)
    inject_adapter_in_model(PeftLora(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                                     lora_dropout=cfg.dropout, target_modules=list(cfg.targets)),
                            model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))


def is_adapter(name: str) -> bool:
    return _A in name or _B in name


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a wrapped model's state dict."""
    return {k: v for k, v in state.items() if is_adapter(k)}


def merged_state(state: dict[str, torch.Tensor], cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """A wrapped model's state -> the plain model's state: W + scale B A (fp32) under W's plain name."""
    s = scale(cfg)
    out = {}
    for k, v in state.items():
        if is_adapter(k):
            continue
        if _BASE in k:
            layer, _, leaf = k.partition(_BASE)
            if leaf == "weight":
                a, b = state[layer + _A + "weight"], state[layer + _B + "weight"]
                v = v.float() + s * (b.float() @ a.float())
            k = f"{layer}.{leaf}"
        out[k] = v
    return out


@torch.no_grad()
def load_merged_into(model: nn.Module, plain: dict[str, torch.Tensor], source: str = "merged weights") -> None:
    """Put plain (merged) weights into a wrapped model: base = merged, B = 0 (A as it is), so the wrapped
    model computes what the plain one would. The base weights are overwritten."""
    from .models.loading import load_state_into

    own = model.state_dict()
    renamed = {}
    for k in own:
        if is_adapter(k):
            renamed[k] = torch.zeros_like(own[k]) if _B in k else own[k]
        else:
            renamed[k] = plain.get(k.replace(_BASE, "."), plain.get(k))
    missing = [k for k, v in renamed.items() if v is None]
    if missing:
        raise CheckpointError(f"{source} does not fit the model: {len(missing)} missing (first: {missing[0]})")
    load_state_into(model, renamed, source=source)


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A cheap identity of a set of weights: names, shapes and a strided sample (<= 4096 numbers, as
    fp32) of each tensor, hashed. Tells two different checkpoints apart; equal weights give equal prints,
    also when one copy is stored in another dtype that holds them exactly (a bf16 file read into fp32)."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach()
        h.update(f"{k}{list(v.shape)}".encode())
        flat = v.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().contiguous()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def save_adapters(path: Path, adapters: dict[str, torch.Tensor], ema: Optional[dict[str, torch.Tensor]],
                  cfg: LoraConfig, base: dict) -> None:
    """lora.safetensors: the adapters, their EMA ("ema." + name), and in the metadata the LoRA settings
    and `base` ({"source", "fingerprint"}: what the adapters sit on)."""
    from safetensors.torch import save_file

    from .io import atomic_path

    tensors = {k: v.detach().contiguous().cpu() for k, v in adapters.items()}
    tensors.update({EMA_PREFIX + k: v.detach().contiguous().cpu() for k, v in (ema or {}).items()})
    meta = {"lora": json.dumps({"rank": cfg.rank, "alpha": cfg.alpha, "targets": list(cfg.targets)}),
            "base": json.dumps(base)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_adapters(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(adapters, EMA adapters, metadata {"lora": settings, "base": {"source", "fingerprint"}}) from
    lora.safetensors; CheckpointError (one line) when missing or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a LoRA run's checkpoint keeps its adapters there; "
                              "resume from another checkpoint or start a new train.run_dir")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items() if k in ("lora", "base")}
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0]}; the file is damaged") from None
    if set(meta) != {"lora", "base"} or not tensors:
        raise CheckpointError(f"{path} is not an adapter file of this toolkit (no LoRA settings in its metadata)")
    ema = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
    return {k: v for k, v in tensors.items() if not k.startswith(EMA_PREFIX)}, ema, meta


def check_base(base: dict, print_now: str, init_from: str) -> None:
    """The base weights loaded now are those the adapters were trained on, else CheckpointError."""
    if base.get("fingerprint") != print_now:
        raise CheckpointError(
            f"train.init_from={init_from} is not the base these adapters were trained on (it was "
            f"{base.get('source')}, fingerprint {base.get('fingerprint')}, now {print_now}); point "
            "train.init_from at the original base weights")


@torch.no_grad()
def load_adapters(model: nn.Module, adapters: dict[str, torch.Tensor], source: str) -> None:
    """Copy `adapters` into the wrapped `model` (every adapter of the model, shapes checked)."""
    own = adapter_state(model.state_dict())
    missing = [k for k in own if k not in adapters]
    if missing or len(adapters) != len(own):
        raise CheckpointError(f"{source} does not fit the model's adapters ({len(adapters)} tensors for {len(own)}, "
                              f"first missing: {missing[0] if missing else 'none'}); check train.lora")
    for k, v in own.items():
        if v.shape != adapters[k].shape:
            raise CheckpointError(f"{source}: {k} has shape {list(adapters[k].shape)}, the model expects "
                                  f"{list(v.shape)}; check train.lora.rank")
        v.copy_(adapters[k].to(v.dtype))


class LoraRun:
    """The trainer's side of LoRA: wraps the model once its base weights are loaded (remembering what
    they were), writes a checkpoint's files and reads them back on a resume."""

    def __init__(self, cfg: LoraConfig, model: nn.Module, source: str):
        """`model`: the plain model holding the base weights read from `source` (train.init_from)."""
        self.cfg, self.source = cfg, source
        self.base = {"source": source, "fingerprint": fingerprint(model.state_dict())}
        add_adapters(model, cfg)
        self.trained = sum(p.numel() for p in model.parameters() if p.requires_grad)

    load_merged = staticmethod(load_merged_into)

    def export(self, folder: Path, state: dict[str, torch.Tensor], ema) -> tuple[dict, Optional[dict]]:
        """Write `folder`/lora.safetensors from the wrapped model's `state` (and the EMA's adapter
        shadows); return the merged (plain) weights and merged EMA weights the caller saves."""
        from .checkpoint import LORA_WEIGHTS

        shadow = ema.state_dict() if ema is not None else None
        save_adapters(folder / LORA_WEIGHTS, adapter_state(state), shadow, self.cfg, self.base)
        merged_ema = merged_state({**state, **shadow}, self.cfg) if shadow is not None else None
        return merged_state(state, self.cfg), merged_ema

    def resume(self, ckpt: Path, model: nn.Module, load_weights: bool) -> dict[str, torch.Tensor]:
        """Check that the base loaded now is the one `ckpt`'s adapters were trained on; load the adapters
        into `model` when `load_weights` (DeepSpeed restores its module itself). Returns the EMA shadows
        ({} when the run kept none)."""
        from .checkpoint import LORA_WEIGHTS

        adapters, ema, meta = read_adapters(Path(ckpt) / LORA_WEIGHTS)
        check_base(meta["base"], self.base["fingerprint"], self.source)
        if load_weights:
            load_adapters(model, adapters, str(Path(ckpt) / LORA_WEIGHTS))
        return ema


# ----------------------------------------------------------------------------- sampling with an adapter file


def adapter_file(path: str | Path) -> Path:
    """`path` as an adapter file: lora.safetensors itself, a checkpoint folder holding one, or a LoRA run
    (its latest checkpoint's). CheckpointError (one line) otherwise."""
    from .checkpoint import LORA_WEIGHTS, resolve_trainer_checkpoint

    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise CheckpointError(f"{path} does not exist; pass a lora.safetensors file or a LoRA run / checkpoint folder")
    file = (p if (p / LORA_WEIGHTS).is_file() else resolve_trainer_checkpoint(p)) / LORA_WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{path} holds no {LORA_WEIGHTS}: it is not a LoRA run (train.lora.rank > 0)")
    return file


def merge_file(state: dict[str, torch.Tensor], path: str | Path, use_ema: bool = True) -> tuple[dict, dict]:
    """Merge the adapters of `path` (adapter_file) into a plain model `state`: W + (alpha / rank) B A for
    each adapted layer (their EMA when the file has one and `use_ema`). Returns (the merged state, what
    was applied: {"file", "ema", "base_matches"}); `base_matches` is False when `state` is not the base
    the adapters were trained on (the caller warns: applying them elsewhere is allowed)."""
    file = adapter_file(path)
    adapters, ema, meta = read_adapters(file)
    use = ema if use_ema and ema else adapters
    s = (meta["lora"]["alpha"] or meta["lora"]["rank"]) / meta["lora"]["rank"]
    matches = fingerprint(state) == meta["base"].get("fingerprint")
    out = dict(state)
    for key in use:
        if _A not in key:
            continue
        layer = key.split(_A)[0]
        weight, b = layer + ".weight", use.get(layer + _B + "weight")
        if weight not in out or b is None:
            raise CheckpointError(f"{file} adapts {layer}, which this model has not; the adapters were trained for "
                                  "another model")
        delta = b.float() @ use[key].float()
        if delta.shape != out[weight].shape:
            raise CheckpointError(f"{file}: the adapters of {layer} make a {list(delta.shape)} update for a "
                                  f"{list(out[weight].shape)} weight; they were trained for other model sizes")
        out[weight] = out[weight].float() + s * delta
    return out, {"file": str(file), "ema": use is ema and bool(ema), "base_matches": matches}
