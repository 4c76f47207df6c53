"""Wan2.2-TI2V-5B as a base: the preset, the Wan2.2 VAE kind (48 channels, 4x16x16: its geometry rules the
resolution and memory checks), a VAE of the other kind refused in one line, and a diffusers-layout Wan2.2
repo (transformer/ + vae/) sampled end to end, also from an image (tiny random weights)."""
import json

import numpy as np
import pytest
import torch
import yaml

from resampling_forcing.config import ConfigError, config_from_dict, load_config
from resampling_forcing.encoders import EncoderLoadError, build_vae
from resampling_forcing.mp4 import read_mp4
from resampling_forcing.memory import codec_geometry
from resampling_forcing.models.wan import CausalWanModel

from helpers import load_sample_cli

CLI = load_sample_cli()


def _cfg(**data):
    return config_from_dict(dict(model=dict(preset="wan2.2-ti2v-5b", chunk_frames=3),
                                 encoders=dict(vae="wan2.2", vae_path="x", text="umt5", text_path="x"),
                                 data={**dict(height=704, width=1280, fps=24.0, num_frames=117), **data}))


def test_preset_and_geometry():
    cfg = _cfg()
    m = cfg.model
    assert (m.dim, m.num_heads, m.num_layers, m.ffn_dim, m.in_channels) == (3072, 24, 30, 14336, 48)
    assert codec_geometry(cfg) == dict(channels=48, spatial=16, temporal=4, causal=True)
    with torch.device("meta"):
        model = CausalWanModel(m)
    assert model.chunk_tokens(704 // 16, 1280 // 16) == 3 * 880  # 44 x 80 latents, 2x2 patches, 3 frames
    assert 4.9e9 < sum(p.numel() for p in model.parameters()) < 5.1e9
    with pytest.raises(ConfigError, match=r"data.height=720: must be a multiple of 32 .* e.g. 704"):
        _cfg(height=720)
    with pytest.raises(ConfigError, match="gives 31 latent frames.*use data.num_frames=117 or 129"):
        _cfg(num_frames=121)
    # the 5B's 48 channels with the Wan2.1 VAE kind: refused before its geometry rules anything
    with pytest.raises(ConfigError, match="encoders.vae=wan gives 16 latent channels, model.in_channels=48 is "
                                          "Wan2.2-TI2V-5B's: set encoders.vae=wan2.2"):
        config_from_dict(dict(model=dict(preset="wan2.2-ti2v-5b"), encoders=dict(vae="wan", vae_path="x")))
    with pytest.raises(ConfigError, match="set encoders.vae=wan$"):
        config_from_dict(dict(model=dict(preset="wan2.1-t2v-1.3b"), encoders=dict(vae="wan2.2", vae_path="x")))


def _wan_vae(root, wan22: bool):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    kw = dict(is_residual=True, patch_size=2, in_channels=12, out_channels=12) if wan22 else {}
    AutoencoderKLWan(base_dim=8, z_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1, latents_mean=[0.0] * 8,
                     latents_std=[1.0] * 8, **kw).eval().save_pretrained(root / "vae")
    return root


def test_a_vae_of_the_other_kind_is_one_line(tmp_path):
    v21, v22 = _wan_vae(tmp_path / "v21", False), _wan_vae(tmp_path / "v22", True)
    assert build_vae("wan2.2", path=v22).spatial_factor == 16 and build_vae("wan", path=v21).spatial_factor == 8
    with pytest.raises(EncoderLoadError, match=r"4x8x8: set encoders.vae=wan$"):
        build_vae("wan2.2", path=v21)
    with pytest.raises(EncoderLoadError, match=r"4x16x16: set encoders.vae=wan2.2$"):
        build_vae("wan", path=v22)


def test_a_wan22_repo_samples_end_to_end(tmp_path, capsys):
    import diffusers
    import imageio.v3 as iio

    root = _wan_vae(tmp_path / "Wan2.2-tiny", True)
    torch.manual_seed(1)
    diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                    in_channels=8, out_channels=8, text_dim=8, freq_dim=16, ffn_dim=48,
                                    num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                    eps=1e-6).save_pretrained(root / "transformer")
    yml = tmp_path / "wan22.yaml"
    yml.write_text(yaml.safe_dump(dict(
        model=dict(chunk_frames=1), encoders=dict(vae="wan2.2", text="hash", text_dim=8, text_len=6),
        data=dict(height=32, width=64, fps=24.0), diffusion=dict(sample_steps=2, cfg_scale=2.0))))
    out = tmp_path / "v.mp4"
    assert CLI.main([str(a) for a in ("--checkpoint", root, "--config", yml, "--prompt", "a red circle",
                                      "--num-chunks", 3, "--device", "cpu", "--quiet", "--output", out)]) == 0
    assert read_mp4(out).shape == (1 + 4 + 4, 32, 64, 3)  # causal in time: 1 + 4k frames for 1 + k latent frames
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["pipeline"]["latent_hw"] == [2, 4] and meta["pipeline"]["encoders"]["vae"] == "wan2.2"
    img = tmp_path / "first.png"
    iio.imwrite(img, np.full((32, 64, 3), 120, np.uint8))
    out2 = tmp_path / "i2v.mp4"
    assert CLI.main([str(a) for a in ("--checkpoint", root, "--config", yml, "--prompt", "a red circle",
                                      "--init-image", img, "--num-chunks", 2, "--device", "cpu", "--quiet",
                                      "--output", out2)]) == 0
    assert read_mp4(out2).shape[1:] == (32, 64, 3)
    # the Wan2.1 kind on a Wan2.2 VAE: one line naming the fix, exit 2
    capsys.readouterr()
    assert CLI.main([str(a) for a in ("--checkpoint", root, "--config", yml, "--set", "encoders.vae=wan",
                                      "--prompt", "x", "--num-chunks", 1, "--device", "cpu", "--quiet",
                                      "--output", tmp_path / "bad.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "set encoders.vae=wan2.2" in err, err


def test_the_shipped_configs_validate():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        cfg = load_config(path)  # types, ranges and the geometry rules
        if cfg.encoders.vae in ("wan", "wan2.2"):
            geo = codec_geometry(cfg)
            assert cfg.model.in_channels == geo["channels"], path.name
