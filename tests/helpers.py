"""Small builders shared by tests."""
import json
from pathlib import Path

import torch
import yaml

from resampling_forcing.config import ModelConfig, config_from_dict, to_dict
from resampling_forcing.models.loading import save_model
from resampling_forcing.models.wan import CausalWanModel


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(in_channels=4, out_channels=4, dim=32, ffn_dim=48, num_heads=2, num_layers=2,
                patch_size=[1, 2, 2], text_dim=8, freq_dim=16, chunk_frames=2)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed=0, **kw) -> CausalWanModel:
    torch.manual_seed(seed)
    m = CausalWanModel(tiny_model_config(**kw))
    with torch.no_grad():  # break the zero-init symmetries so every path matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def tiny_run_config(**sections):
    data = {
        "model": dict(in_channels=12, out_channels=12, dim=32, ffn_dim=48, num_heads=2, num_layers=2,
                      patch_size=[1, 2, 2], text_dim=8, freq_dim=16, chunk_frames=2),
        "encoders": dict(vae="pixel_shuffle", vae_factor=2, text="hash", text_len=6, text_dim=8),
        "data": dict(height=8, width=8, fps=4.0),
        "diffusion": dict(sample_steps=2, sample_shift=3.0, cfg_scale=2.0),
    }
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return config_from_dict(data)


def save_checkpoint_for_tests(root, *, step=10, seed=0, ema=False, cfg=None, model_overrides=None):
    """A run dir as the trainer writes it: RUN/config.yaml, RUN/checkpoints/step_XXXXXXX/
    {model.safetensors, model_config.json, config.yaml[, ema.safetensors]}. Returns RUN."""
    root = Path(root)
    cfg = cfg or tiny_run_config()
    mcfg = cfg.model if not model_overrides else type(cfg.model)(**{**to_dict(cfg.model), **model_overrides})
    torch.manual_seed(seed)
    model = CausalWanModel(mcfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ck = root / "checkpoints" / f"step_{step:07d}"
    save_model(model, ck)
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    (ck / "config.yaml").write_text(text)
    (ck / "trainer_state.json").write_text(json.dumps({"step": step}))  # the trainer's completion mark
    (root / "config.yaml").write_text(text)
    if ema:
        from safetensors.torch import save_file

        save_file({k: (v + 0.1).contiguous() for k, v in model.state_dict().items()}, str(ck / "ema.safetensors"))
    return root


def load_script(relpath: str, name: str):
    """A script of the repository (e.g. "bench/rope_period.py": not a package member) as a module named
    `name`, for calling its main(argv)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / relpath)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_sample_cli():
    """sample/sample.py as a module, for calling its main(argv)."""
    return load_script("sample/sample.py", "sample_cli")


def ffmpeg_children() -> dict[int, str]:
    """This process's ffmpeg children: pid -> state (R, S, D, Z, ...), from /proc (Linux)."""
    import os

    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
            if "ffmpeg" in name and int(rest[1]) == os.getpid():
                out[int(entry)] = rest[0]
    return out
