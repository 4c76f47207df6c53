"""The [history | noisy] training forward: mask rule, no leakage, equivalence to running each
chunk on its own history, and agreement of the FlexAttention and SDPA backends."""
import pytest
import torch

from resampling_forcing.attention.masks import MaskSpec, block_mask, dense_mask
from resampling_forcing.attention.ops import MaskedAttention
from resampling_forcing.attention.backends import attention
from helpers import tiny_model

N, T = 5, 7


def brute_force(n, t):
    """The rule of method.md section 3, one entry at a time, over [H_1..H_{n-1} | Q_1..Q_n] (H_n dropped)."""
    ht = (n - 1) * t  # history tokens
    L = ht + n * t
    m = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            q_stream, qc = (0, q) if q < ht else (1, q - ht)
            k_stream, kc = (0, k) if k < ht else (1, k - ht)
            qc, kc = qc // t, kc // t
            if q_stream == 0:
                m[q, k] = k_stream == 0 and kc <= qc
            else:
                m[q, k] = (k_stream == 1 and kc == qc) or (k_stream == 0 and kc < qc)
    return m


def test_dual_mask_equals_rule_table():
    assert torch.equal(dense_mask(MaskSpec("dual", N, T)), brute_force(N, T))


def test_block_causal_mask():
    m = dense_mask(MaskSpec("block_causal", 4, 3))
    want = torch.tensor([[kc <= qc for kc in range(4) for _ in range(3)] for qc in range(4) for _ in range(3)])
    assert torch.equal(m, want)


def test_block_mask_padding_matches_dense():
    """The padded BlockMask (70 tokens -> 128) keeps exactly the dense rule on real tokens."""
    spec = MaskSpec("dual", N, T)
    bm = block_mask(spec, "cpu")
    dense = bm.to_dense()  # tile-level
    assert dense.shape[-1] == 1 and dense.shape[-2] == 1  # one 128x128 tile
    q, k, v = (torch.randn(2, 3, spec.seq_len, 16) for _ in range(3))
    with torch.no_grad():
        flex = attention(q, k, v, spec, "flex")
    sdpa = attention(q, k, v, spec, "sdpa")
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)


def _data(model, n_chunks=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cf = model.cfg.chunk_frames
    hist = torch.randn(2, 4, n_chunks * cf, 2, 14, generator=g)  # 1 x 7 tokens per frame
    noisy = torch.randn(2, 4, n_chunks * cf, 2, 14, generator=g)
    t = torch.rand(2, n_chunks, generator=g)
    ctx = torch.randn(2, 5, 8, generator=g)
    return hist, noisy, t, ctx


def _dual(model, hist, noisy, t, ctx, backend="sdpa"):
    n = t.shape[1]
    spec = MaskSpec("dual", n, model.chunk_tokens(*hist.shape[-2:]))
    return model.forward_dual(hist, noisy, t, ctx, MaskedAttention(spec, backend))


@pytest.mark.parametrize("prediction", ["velocity", "x0"])
def test_no_leakage(prediction):
    model = tiny_model(prediction=prediction)
    hist, noisy, t, ctx = _data(model)
    cf = model.cfg.chunk_frames
    base = _dual(model, hist, noisy, t, ctx)
    i = 2  # chunk under test
    sl = slice(i * cf, (i + 1) * cf)

    def changed(h=hist, q=noisy):
        out = _dual(model, h, q, t, ctx)
        return (out[:, :, sl] - base[:, :, sl]).abs().max().item()

    def perturb(x, chunk):
        x = x.clone()
        x[:, :, chunk * cf:(chunk + 1) * cf] += 1.0
        return x

    assert changed(h=perturb(hist, i)) == 0.0, "Q_i must not see its own clean copy H_i"
    assert changed(h=perturb(hist, i + 1)) == 0.0, "Q_i must not see future history"
    assert changed(q=perturb(noisy, i - 1)) == 0.0, "Q_i must not see other noisy chunks"
    assert changed(q=perturb(noisy, i + 1)) == 0.0, "Q_i must not see other noisy chunks"
    assert changed(h=perturb(hist, i - 1)) > 1e-3, "Q_i must see its history H_{i-1}"
    assert changed(h=perturb(hist, 0)) > 1e-3, "Q_i must see its history H_0"


def test_each_chunk_equals_its_own_history_run():
    """Q_i of the dual forward == model on [H_1..H_{i-1}, Q_i] under a block-causal mask."""
    model = tiny_model()
    hist, noisy, t, ctx = _data(model)
    cf = model.cfg.chunk_frames
    dual = _dual(model, hist, noisy, t, ctx)
    for i in range(t.shape[1]):
        x = torch.cat([hist[:, :, : i * cf], noisy[:, :, i * cf:(i + 1) * cf]], dim=2)
        tg = torch.cat([torch.zeros(2, i), t[:, i:i + 1]], dim=1)
        spec = MaskSpec("block_causal", i + 1, model.chunk_tokens(2, 14))
        alone = model(x, tg, ctx, attn=MaskedAttention(spec, "sdpa"))
        torch.testing.assert_close(dual[:, :, i * cf:(i + 1) * cf], alone[:, :, i * cf:], rtol=1e-5, atol=1e-5)


def test_flex_and_sdpa_model_forward_agree():
    model = tiny_model()
    hist, noisy, t, ctx = _data(model, n_chunks=3)
    with torch.no_grad():
        a = _dual(model, hist, noisy, t, ctx, "sdpa")
        b = _dual(model, hist, noisy, t, ctx, "flex")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradients_flow_only_to_allowed_inputs():
    model = tiny_model()
    hist, noisy, t, ctx = _data(model, n_chunks=3)
    hist.requires_grad_(True)
    cf = model.cfg.chunk_frames
    out = _dual(model, hist, noisy, t, ctx)
    out[:, :, cf:2 * cf].sum().backward()  # loss on Q_1 only
    g = hist.grad.abs().sum(dim=(0, 1, 3, 4))
    assert g[:cf].sum() > 0 and g[cf:].sum() == 0


def _full_layout_velocity(model, hist, noisy, t, ctx):
    """The dual forward as the paper writes it, [H_1..H_N | Q_1..Q_N] with H_N kept, under the mask of
    `brute_force_full` (an independent reference for the trimmed layout forward_dual runs)."""
    n, cf = t.shape[1], model.cfg.chunk_frames
    frames, hh, ww = noisy.shape[2:]
    T = model.chunk_tokens(hh, ww)
    cos, sin = model.rope(torch.arange(frames), hh, ww)
    tokens = torch.cat([model.patchify(hist), model.patchify(noisy)], dim=1)
    mask = brute_force_full(n, T)

    def attn(q, k, v, layer):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    t_groups = torch.cat([torch.zeros_like(t), t], dim=1).float()
    raw = model.run_tokens(tokens, t_groups, torch.cat([cos, cos]), torch.cat([sin, sin]), model.text_kv(ctx), attn)
    raw = model.unpatchify(raw[:, n * T:], frames, hh, ww)
    return model.to_velocity(raw, noisy, t.float().repeat_interleave(cf, dim=1))


def brute_force_full(n, t):
    """method.md section 3 over [H_1..H_n | Q_1..Q_n], H_n included."""
    nt = n * t
    r = torch.arange(2 * nt)
    hist, chunk = r < nt, (r % nt) // t
    q_h, k_h, qc, kc = hist[:, None], hist[None, :], chunk[:, None], chunk[None, :]
    return (q_h & k_h & (kc <= qc)) | (~q_h & ((k_h & (kc < qc)) | (~k_h & (kc == qc))))


@pytest.mark.parametrize("n_chunks", [1, 2, 5])
@pytest.mark.parametrize("prediction", ["velocity", "x0"])
def test_dropping_the_last_history_chunk_is_exact(n_chunks, prediction):
    """forward_dual leaves H_N out (nobody attends it): its velocity and the loss gradients equal the full
    [H_1..H_N | Q_1..Q_N] forward's, on an odd chunk size (7 tokens per frame, 2 frames per chunk)."""
    model = tiny_model(prediction=prediction).train().requires_grad_(True)
    hist, noisy, t, ctx = _data(model, n_chunks=n_chunks, seed=3)
    spec = MaskSpec("dual", n_chunks, model.chunk_tokens(2, 14))
    assert spec.history_chunks == n_chunks - 1
    assert spec.seq_len == (2 * n_chunks - 1) * model.chunk_tokens(2, 14)
    params = list(model.parameters())
    v = model.forward_dual(hist, noisy, t, ctx, MaskedAttention(spec, "sdpa"))
    ref = _full_layout_velocity(model, hist, noisy, t, ctx)
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-6)
    target = torch.randn_like(v)
    g = torch.autograd.grad(((v - target) ** 2).mean(), params)
    g_ref = torch.autograd.grad(((ref - target) ** 2).mean(), params)
    assert any(x.abs().sum() > 0 for x in g)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_training_memory_estimate_counts_the_trimmed_layout():
    """memory.train_memory (the up-front refusal of a run that cannot fit) counts the tokens the forward
    runs, (2N-1) T, not 2 N T (twice too many at N = 1)."""
    from resampling_forcing.config import load_config
    from resampling_forcing.memory import codec_geometry, latent_frames, tokens_per_chunk, train_memory
    from train_helpers import TINY_YAML

    for frames in (12, 2):  # 6 chunks, 1 chunk
        cfg = load_config(TINY_YAML, [f"data.num_frames={frames}"])
        geo = codec_geometry(cfg)
        n = latent_frames(geo, frames) // cfg.model.chunk_frames
        T = tokens_per_chunk(cfg, cfg.data.height // geo["spatial"], cfg.data.width // geo["spatial"])
        m = cfg.model
        want = cfg.train.batch_size * (2 * n - 1) * T * m.dim * 4 * m.num_layers
        assert train_memory(cfg)["parts"]["activations"] == want
