"""The KV-cached rollout path equals the training forward chunk for chunk."""
import torch

from resampling_forcing.attention.masks import MaskSpec
from resampling_forcing.attention.ops import MaskedAttention
from resampling_forcing.cache import CachedAttention, KVCache
from helpers import tiny_model


def test_cached_chunks_equal_training_forward():
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    n, cf = 5, model.cfg.chunk_frames
    hist = torch.randn(2, 4, n * cf, 2, 14, generator=g)
    noisy = torch.randn(2, 4, n * cf, 2, 14, generator=g)
    t = torch.rand(2, n, generator=g)
    ctx = torch.randn(2, 5, 8, generator=g)
    spec = MaskSpec("dual", n, model.chunk_tokens(2, 14))
    with torch.no_grad():
        dual = model.forward_dual(hist, noisy, t, ctx, MaskedAttention(spec, "sdpa"))
        # capacity 1 forces the cache to grow while rolling out
        cache = KVCache.for_model(model, 2, (2, 14), "cpu", torch.float32, capacity=1)
        text_kv = model.text_kv(ctx)
        for i in range(n):
            sl = slice(i * cf, (i + 1) * cf)
            v = model(noisy[:, :, sl], t[:, i], attn=CachedAttention(cache, "sdpa"), frame_offset=i * cf,
                      text_kv=text_kv)
            torch.testing.assert_close(v, dual[:, :, sl], rtol=1e-5, atol=1e-5)
            model(hist[:, :, sl], torch.zeros(2), attn=CachedAttention(cache, "sdpa", commit=True),
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
