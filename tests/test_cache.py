"""The KV-cached rollout path equals the training forward chunk for chunk."""
import pytest
import torch

from resampling_forcing.attention.masks import MaskSpec
from resampling_forcing.attention.ops import MaskedAttention
from resampling_forcing.cache import CachedAttention, KVCache
from helpers import tiny_model


@pytest.mark.parametrize("n, chunk_frames, hw, batch, heads", [
    (5, 2, (2, 14), 2, 2),   # 14 tokens per chunk
    (3, 1, (6, 10), 1, 4),   # 15 tokens (odd), one frame per chunk
    (4, 3, (2, 6), 3, 1),    # 9 tokens (odd), three frames, one head
])
def test_cached_chunks_equal_training_forward(n, chunk_frames, hw, batch, heads):
    model = tiny_model(chunk_frames=chunk_frames, num_heads=heads, dim=8 * heads)
    g = torch.Generator().manual_seed(3)
    cf = model.cfg.chunk_frames
    hist = torch.randn(batch, 4, n * cf, *hw, generator=g)
    noisy = torch.randn(batch, 4, n * cf, *hw, generator=g)
    t = torch.rand(batch, n, generator=g)
    ctx = torch.randn(batch, 5, 8, generator=g)
    spec = MaskSpec("dual", n, model.chunk_tokens(*hw))
    with torch.no_grad():
        dual = model.forward_dual(hist, noisy, t, ctx, MaskedAttention(spec, "sdpa"))
        # capacity 1 forces the cache to grow while rolling out
        cache = KVCache.for_model(model, batch, hw, "cpu", torch.float32, capacity=1)
        text_kv = model.text_kv(ctx)
        for i in range(n):
            sl = slice(i * cf, (i + 1) * cf)
            v = model(noisy[:, :, sl], t[:, i], attn=CachedAttention(cache, "sdpa"), frame_offset=i * cf,
                      text_kv=text_kv)
            torch.testing.assert_close(v, dual[:, :, sl], rtol=1e-5, atol=1e-5)
            model(hist[:, :, sl], torch.zeros(batch), attn=CachedAttention(cache, "sdpa", commit=True),
                  frame_offset=i * cf, text_kv=text_kv)
            cache.commit()
    assert cache.num_chunks == n and cache.capacity >= n
    # mean keys are the per-chunk means of the stored keys
    k, _, mean_k = cache.history(0)
    torch.testing.assert_close(mean_k, k.unflatten(2, (n, -1)).mean(dim=3))


def test_wrong_chunk_size_rejected():
    model = tiny_model()
    cache = KVCache.for_model(model, 1, (2, 14), "cpu", torch.float32)
    x = torch.randn(1, 4, 1, 2, 14)  # one frame but chunks are 2 frames
    try:
        model(x, torch.zeros(1), torch.randn(1, 3, 8), attn=CachedAttention(cache, "sdpa"))
    except ValueError as e:
        assert "cache holds chunks of 14" in str(e)
    else:
        raise AssertionError("a partial chunk must be rejected")
