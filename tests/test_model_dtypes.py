import torch

from helpers import tiny_model


def test_bf16_model_runs_on_cpu_and_tracks_fp32():
    model = tiny_model()
    x, t, ctx = torch.randn(1, 4, 2, 2, 14), torch.tensor([0.4]), torch.randn(1, 5, 8)
    with torch.no_grad():
        ref = model(x, t, ctx)
        low = model.to(torch.bfloat16)(x.bfloat16(), t, ctx.bfloat16())
    assert low.dtype == torch.bfloat16
    err = (low.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05, f"bf16 relative error {err:.3f}"
