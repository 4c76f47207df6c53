"""Small builders shared by tests."""
import torch

from resampling_forcing.config import ModelConfig
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
