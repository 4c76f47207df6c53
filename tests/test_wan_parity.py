"""Our causal Wan2.1 model loads diffusers and original-layout checkpoints and matches
diffusers' WanTransformer3DModel (full attention) to fp32 precision."""
import json

import diffusers
import pytest
import torch
from safetensors.torch import save_file

from resampling_forcing.models.loading import (CheckpointError, diffusers_to_wan_key, load_model,
                                                save_model)



def tiny_diffusers(seed=0):
    torch.manual_seed(seed)
    m = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=40, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6)
    # Random non-trivial norms and modulation tables so a mis-mapped tensor shows.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    ref = tiny_diffusers()
    ref.save_pretrained(root / "repo" / "transformer", max_shard_size="20KB")  # sharded + index
    # The original Wan release layout: Wan key names + Wan's config.json.
    orig = root / "original"
    orig.mkdir()
    save_file({diffusers_to_wan_key(k): v.contiguous() for k, v in ref.state_dict().items()},
              str(orig / "diffusion_pytorch_model.safetensors"))
    (orig / "config.json").write_text(json.dumps(dict(
        _class_name="WanModel", model_type="t2v", dim=24, ffn_dim=40, freq_dim=32, in_dim=4, out_dim=4,
        num_heads=2, num_layers=2, text_len=512, text_dim=16, eps=1e-6)))
    return ref, root


def inputs(frames=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, frames, 6, 10, generator=g)
    ctx = torch.randn(2, 7, 16, generator=g)
    return x, ctx


@pytest.mark.parametrize("layout", ["repo", "repo/transformer", "original"])
def test_matches_diffusers_one_timestep(saved, layout):
    ref, root = saved
    ours = load_model(root / layout).eval()
    x, ctx = inputs()
    t = torch.tensor([0.37, 0.81])
    with torch.no_grad():
        want = ref(x, t * 1000, ctx, return_dict=False)[0]
        got = ours(x, t, ctx)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_matches_diffusers_per_token_timesteps(saved):
    """diffusers takes timestep [B, seq_len]; ours takes one t per chunk of frames."""
    ref, root = saved
    ours = load_model(root / "repo").eval()
    x, ctx = inputs(frames=4)
    t_chunks = torch.tensor([[0.1, 0.9], [0.5, 0.2]])  # 2 chunks of 2 latent frames
    tokens_per_frame = (6 // 2) * (10 // 2)
    t_tokens = t_chunks.repeat_interleave(2 * tokens_per_frame, dim=1)
    with torch.no_grad():
        want = ref(x, t_tokens * 1000, ctx, return_dict=False)[0]
        got = ours(x, t_chunks, ctx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # And the timesteps really matter per chunk: swapping them changes the output.
    with torch.no_grad():
        other = ours(x, t_chunks.flip(1), ctx)
    assert (other - got).abs().max() > 1e-3


def test_own_format_roundtrip(saved, tmp_path):
    _, root = saved
    a = load_model(root / "repo")
    save_model(a, tmp_path / "ours")
    b = load_model(tmp_path / "ours")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert not list((tmp_path / "ours").glob("*.tmp"))


def test_shape_mismatch_names_tensor(saved, tmp_path):
    _, root = saved
    a = load_model(root / "repo")
    save_model(a, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "model_config.json").read_text())
    cfg["ffn_dim"] = 48
    (tmp_path / "ours" / "model_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ffn\.0\.weight has shape \[40, 24\]"):
        load_model(tmp_path / "ours")


def test_missing_keys_named(saved, tmp_path):
    _, root = saved
    orig = tmp_path / "orig"
    orig.mkdir()
    (orig / "config.json").write_text((root / "original" / "config.json").read_text())
    from safetensors.torch import load_file
    state = load_file(str(root / "original" / "diffusion_pytorch_model.safetensors"))
    state.pop("head.modulation")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(orig / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing \(first: head\.modulation\).*unexpected \(first: extra\.weight\)"):
        load_model(orig)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="neither model_config.json nor config.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("index", ["{bad", '{"weight_map": 5}', '{"metadata": {}}', '{"weight_map": {"a": 3}}'])
def test_a_damaged_shard_index_is_one_named_error(saved, tmp_path, index):
    """A sharded repo whose *.safetensors.index.json is not an index: CheckpointError naming the file (it was
    a JSONDecodeError / AttributeError / KeyError traceback)."""
    import shutil

    _, root = saved
    repo = tmp_path / "t"
    shutil.copytree(root / "repo" / "transformer", repo)
    (idx,) = repo.glob("*.safetensors.index.json")
    idx.write_text(index)
    with pytest.raises(CheckpointError, match=f"{idx.name} is not a readable shard index") as e:
        load_model(repo)
    assert "\n" not in str(e.value)
