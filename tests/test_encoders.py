"""Tests for resampling_forcing.encoders: Wan VAE (tiny random), umT5 (tiny random), tiny encoders."""
from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from resampling_forcing.encoders import (
    DecodeState,
    EncoderLoadError,
    HashTextEncoder,
    PixelShuffleVAE,
    UMT5TextEncoder,
    WanVAE,
    build_text_encoder,
    build_vae,
)

Z = 4  # tiny VAE latent channels
MEAN = [0.1, -0.2, 0.3, 0.0]
STD = [1.5, 0.5, 2.0, 1.0]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def wan_repo(tmp_path_factory):
    """A diffusers-style repo root with a tiny random AutoencoderKLWan in vae/."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    model = AutoencoderKLWan(base_dim=8, z_dim=Z, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                             latents_mean=MEAN, latents_std=STD).eval()
    root = tmp_path_factory.mktemp("wan_repo")
    model.save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def wan_vae(wan_repo):
    return WanVAE(wan_repo)


@pytest.fixture(scope="module")
def umt5_repo(tmp_path_factory):
    """A repo root with a tiny random UMT5EncoderModel in text_encoder/ and an offline-built
    WordLevel fast tokenizer (pad 0, eos 1 appended, unk 2, like T5) in tokenizer/."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = "a an the red green blue yellow circle square moves left right up down and".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    root = tmp_path_factory.mktemp("umt5_repo")
    fast.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=32, d_model=16, d_kv=4, num_heads=2, num_layers=2, d_ff=32,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16)
    UMT5EncoderModel(cfg).eval().save_pretrained(root / "text_encoder")
    return root


def _video(b=2, f=9, h=16, w=24):
    return torch.rand(b, 3, f, h, w) * 2 - 1


def _one_line(msg: str) -> bool:
    return "\n" not in msg.strip()


# ----------------------------------------------------------------------------- Wan VAE


def test_wan_vae_properties_and_shapes(wan_repo, wan_vae):
    # both layouts load: repo root with vae/, and the vae folder itself
    vae2 = WanVAE(wan_repo / "vae")
    assert vae2.latent_channels == wan_vae.latent_channels == Z
    assert (wan_vae.temporal_factor, wan_vae.spatial_factor) == (4, 8)
    assert [wan_vae.frames_for_latents(f) for f in (0, 1, 2, 3, 21)] == [0, 1, 5, 9, 81]
    assert [wan_vae.latents_for_frames(F) for F in (1, 5, 9, 81)] == [1, 2, 3, 21]
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        wan_vae.latents_for_frames(12)
    x = _video()
    z = wan_vae.encode(x)
    assert z.shape == (2, Z, 3, 2, 3) and z.dtype == torch.float32
    y = wan_vae.decode(z)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        wan_vae.encode(_video(f=8))
    with pytest.raises(ValueError, match="multiples of 8"):
        wan_vae.encode(_video(h=12))


def test_wan_vae_normalization_matches_pipeline(wan_vae):
    """encode = (posterior mean - latents_mean) / latents_std; decode inverts it (WanPipeline)."""
    m = wan_vae.model
    x = _video(b=1, f=5)
    mean = torch.tensor(MEAN).view(1, Z, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(STD).view(1, Z, 1, 1, 1)
    with torch.no_grad():
        ref = (m.encode(x).latent_dist.mode() - mean) * inv_std
    z = wan_vae.encode(x)
    torch.testing.assert_close(z, ref, atol=1e-5, rtol=1e-5)
    assert wan_vae.encode(x).equal(z)  # deterministic (posterior mean)
    with torch.no_grad():
        ref_video = m.decode(z / inv_std + mean).sample
    torch.testing.assert_close(wan_vae.decode(z), ref_video, atol=1e-5, rtol=1e-5)


def test_wan_vae_streaming_decode_equals_full_decode(wan_vae):
    z = torch.randn(2, Z, 7, 2, 3)
    with torch.no_grad():  # diffusers' own full decode is the reference
        full = wan_vae.model.decode(z * torch.tensor(STD).view(1, Z, 1, 1, 1)
                                    + torch.tensor(MEAN).view(1, Z, 1, 1, 1)).sample
    assert full.shape[2] == 1 + 4 * 6
    for n in (1, 2, 3, 7):
        parts = list(wan_vae.decode_iter(z, chunk_latent_frames=n))
        assert len(parts) == -(-7 // n)
        torch.testing.assert_close(torch.cat(parts, 2), full, atol=1e-5, rtol=1e-5)
    # explicit state, uneven chunks: first chunk gives 1 + 4(n-1) frames, later ones 4n
    state = wan_vae.init_decode_state()
    outs, s = [], 0
    for n in (1, 3, 2, 0, 1):
        outs.append(wan_vae.decode_chunk(z[:, :, s:s + n], state))
        s += n
    assert [o.shape[2] for o in outs] == [1, 12, 8, 0, 4]
    assert (state.latent_frames_done, state.frames_done) == (7, 25)
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=1e-5, rtol=1e-5)
    # a state belongs to one batch
    with pytest.raises(ValueError, match="new state"):
        wan_vae.decode_chunk(z[:1, :, :1], state)


def test_wan_vae_streaming_wan22_layout_and_bf16():
    """Residual + patchified (Wan2.2-style) VAE: 16x spatial, streaming still equals full decode;
    a bf16 VAE runs end to end."""
    from diffusers import AutoencoderKLWan

    m = AutoencoderKLWan(base_dim=8, z_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1, is_residual=True,
                         patch_size=2, in_channels=12, out_channels=12,
                         latents_mean=[0.0] * 8, latents_std=[1.0] * 8).eval()
    vae = WanVAE.from_model(m)
    assert (vae.latent_channels, vae.temporal_factor, vae.spatial_factor) == (8, 4, 16)
    z = vae.encode(_video(b=1, f=9, h=32, w=32))
    assert z.shape == (1, 8, 3, 2, 2)
    with torch.no_grad():
        full = m.decode(z).sample
    torch.testing.assert_close(torch.cat(list(vae.decode_iter(z, 2)), 2), full, atol=1e-5, rtol=1e-5)
    vae.to(dtype=torch.bfloat16)
    zb = vae.encode(_video(b=1, f=5, h=32, w=32))
    assert zb.dtype == torch.bfloat16 and vae.decode(zb).shape == (1, 3, 5, 32, 32)


def test_wan_vae_load_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(EncoderLoadError) as e:
        WanVAE(missing)
    assert str(missing) in str(e.value) and "vae/config.json" in str(e.value) and _one_line(str(e.value))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EncoderLoadError, match="no config.json") as e:
        WanVAE(empty)
    assert _one_line(str(e.value))
    wrong = tmp_path / "wrong" / "vae"
    wrong.mkdir(parents=True)
    (wrong / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(EncoderLoadError, match="not an AutoencoderKLWan") as e:
        WanVAE(wrong.parent)
    assert _one_line(str(e.value))
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "base_dim": 8}))
    with pytest.raises(EncoderLoadError, match="failed to load") as e:
        WanVAE(noweights)
    assert str(noweights) in str(e.value) and _one_line(str(e.value))


# ----------------------------------------------------------------------------- pixel shuffle


def test_pixel_shuffle_roundtrip_and_streaming():
    vae = PixelShuffleVAE(factor=4)
    assert (vae.latent_channels, vae.temporal_factor, vae.spatial_factor) == (48, 1, 4)
    assert vae.frames_for_latents(12) == 12 and vae.latents_for_frames(12) == 12
    x = _video(b=2, f=12, h=32, w=32)
    z = vae.encode(x)
    assert z.shape == (2, 48, 12, 8, 8)
    assert torch.equal(vae.decode(z), x)
    # channel layout = F.pixel_unshuffle per frame
    torch.testing.assert_close(z[:, :, 5], torch.nn.functional.pixel_unshuffle(x[:, :, 5], 4))
    assert torch.equal(torch.cat(list(vae.decode_iter(z, 5)), 2), x)

    vt = PixelShuffleVAE(factor=2, temporal_factor=2, scale=2.0, shift=0.5)
    assert vt.latent_channels == 24 and vt.frames_for_latents(3) == 6
    zt = vt.encode(x)
    assert zt.shape == (2, 24, 6, 16, 16)
    torch.testing.assert_close(zt[:, :12, 1], (torch.nn.functional.pixel_unshuffle(x[:, :, 2], 2) - 0.5) * 2.0)
    torch.testing.assert_close(vt.decode(zt), x)
    state = vt.init_decode_state()
    parts = [vt.decode_chunk(zt[:, :, s:s + 4], state) for s in (0, 4)]
    assert [p.shape[2] for p in parts] == [8, 4]
    torch.testing.assert_close(torch.cat(parts, 2), x)
    with pytest.raises(ValueError, match="multiple of temporal_factor"):
        vt.encode(_video(f=5, h=32, w=32))
    assert vae.to(dtype=torch.float64).encode(x).dtype == torch.float64


# ----------------------------------------------------------------------------- hash text


def test_hash_text_encoder():
    enc = HashTextEncoder(text_len=6, dim=8, seed=0)
    out = enc.encode(["A red circle.", "", "red circle a", "one two three four five six seven eight"])
    assert out.shape == (4, 6, 8)
    assert torch.count_nonzero(out[1]) == 0                      # empty prompt = unconditional
    assert torch.count_nonzero(out[0, 3:]) == 0 and (out[0, :3].abs().sum(-1) > 0).all()
    assert not torch.allclose(out[0, :3], out[2, :3])            # order matters (position code)
    torch.testing.assert_close(out[0], HashTextEncoder(6, 8).encode(["a  RED circle"])[0])
    assert (out[3].abs().sum(-1) > 0).all()                      # truncated at text_len
    # word vector = N(0,1) from RandomState(crc32("seed:word")): stable golden values
    v = enc.word_vector("red")
    import zlib
    import numpy as np
    ref = np.random.RandomState(zlib.crc32(b"0:red")).standard_normal(8).astype(np.float32)
    assert torch.equal(v, torch.from_numpy(ref))
    torch.testing.assert_close(v[:3], torch.tensor([1.7840616, -0.4926688, -0.9608404]), atol=1e-6, rtol=0)
    # position code is added: word at position 0 = w + sin/cos(0) = w + [0, 1, 0, 1, ...]
    torch.testing.assert_close(out[2, 0], v + torch.tensor([0.0, 1.0] * 4))
    assert not torch.allclose(HashTextEncoder(6, 8, seed=1).encode(["red"]), enc.encode(["red"]))
    assert enc.to(dtype=torch.float64).encode(["red"]).dtype == torch.float64


def test_hash_text_encoder_ngrams():
    words = HashTextEncoder(text_len=6, dim=8)
    enc = HashTextEncoder(text_len=6, dim=8, ngram=3)
    out, base = enc.encode(["a green square x"])[0], words.encode(["a green square x"])[0]
    w = enc.word_vector
    # word i carries the 2- and 3-grams starting at it, where the caption has them
    torch.testing.assert_close(out[1] - base[1], w("green square") + w("green square x"))
    torch.testing.assert_close(out[2] - base[2], w("square x"))
    torch.testing.assert_close(out[3], base[3])
    assert torch.count_nonzero(out[4:]) == 0
    # the colour token of an object now differs with the shape it names
    g = HashTextEncoder(text_len=6, dim=8, ngram=2).encode(["a green square", "a green circle"])
    assert not torch.allclose(g[0, 1], g[1, 1])
    torch.testing.assert_close(words.encode(["a green square"])[0, 1], words.encode(["a green circle"])[0, 1])
    with pytest.raises(ValueError, match="ngram"):
        HashTextEncoder(ngram=0)
    assert build_text_encoder({"kind": "hash", "text_len": 6, "dim": 8, "ngram": 3}).ngram == 3


# ----------------------------------------------------------------------------- umT5


def test_umt5_matches_wan_pipeline(umt5_repo):
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    enc = UMT5TextEncoder(umt5_repo, text_len=8)
    assert enc.text_dim == 16
    prompts = ["a red circle moves left", "", "  the blue   square &amp; a green circle moves up and down"]
    out = enc.encode(prompts)
    assert out.shape == (3, 8, 16)

    # reference 1: diffusers' own function on a stand-in pipeline object
    fake = types.SimpleNamespace(tokenizer=enc.tokenizer, text_encoder=enc.model,
                                 _execution_device=torch.device("cpu"))
    ref = WanPipeline._get_t5_prompt_embeds(fake, prompts, max_sequence_length=8,
                                           device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)

    # reference 2: direct transformers computation with independently loaded model + tokenizer
    tok = AutoTokenizer.from_pretrained(umt5_repo / "tokenizer")
    model = UMT5EncoderModel.from_pretrained(umt5_repo / "text_encoder").eval()
    cleaned = ["a red circle moves left", "", "the blue square & a green circle moves up and down"]
    t = tok(cleaned, padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = model(t.input_ids, t.attention_mask).last_hidden_state
    lens = t.attention_mask.sum(1)
    assert lens.tolist() == [6, 1, 8]  # eos appended; third prompt truncated
    for b, n in enumerate(lens.tolist()):
        torch.testing.assert_close(out[b, :n], h[b, :n], atol=1e-6, rtol=1e-6)
        assert torch.count_nonzero(out[b, n:]) == 0
        assert torch.count_nonzero(h[b, n:]) > 0 or n == 8  # the zeros are ours, not the model's

    # explicit paths work too
    enc2 = UMT5TextEncoder(text_encoder_path=umt5_repo / "text_encoder",
                           tokenizer_path=umt5_repo / "tokenizer", text_len=8)
    torch.testing.assert_close(enc2.encode(prompts), out, atol=0, rtol=0)


def test_umt5_load_errors(tmp_path, umt5_repo):
    with pytest.raises(EncoderLoadError) as e:
        UMT5TextEncoder(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(e.value) and "text_encoder/" in str(e.value)
    assert _one_line(str(e.value))
    with pytest.raises(EncoderLoadError, match="no tokenizer files"):
        UMT5TextEncoder(text_encoder_path=umt5_repo / "text_encoder", tokenizer_path=tmp_path)


# ----------------------------------------------------------------------------- factories


def test_factories(wan_repo, umt5_repo):
    from resampling_forcing.config import EncoderConfig

    v = build_vae("pixel_shuffle")
    assert isinstance(v, PixelShuffleVAE) and v.latent_channels == 48
    v = build_vae(EncoderConfig(vae="pixel_shuffle", vae_factor=2))
    assert v.spatial_factor == 2 and v.latent_channels == 12
    v = build_vae({"kind": "pixel_shuffle", "factor": 8, "temporal_factor": 2}, dtype=torch.float64)
    assert (v.spatial_factor, v.temporal_factor, v.dtype) == (8, 2, torch.float64)
    v = build_vae(EncoderConfig(vae="wan", vae_path=str(wan_repo)))
    assert isinstance(v, WanVAE) and v.latent_channels == Z
    assert isinstance(build_vae({"kind": "wan", "path": str(wan_repo / "vae")}), WanVAE)
    with pytest.raises(ValueError, match="'wan', 'wan2.2', 'pixel_shuffle'"):
        build_vae({"kind": "sd"})
    with pytest.raises(ValueError, match="needs a path"):
        build_vae("wan")

    t = build_text_encoder(EncoderConfig(text="hash", text_len=16, text_dim=32))
    assert isinstance(t, HashTextEncoder) and t.encode(["x"]).shape == (1, 16, 32)
    t = build_text_encoder({"kind": "hash", "text_len": 4, "dim": 6, "seed": 3})
    assert (t.text_len, t.text_dim, t.seed) == (4, 6, 3)
    t = build_text_encoder(EncoderConfig(text="umt5", text_path=str(umt5_repo), text_len=8))
    assert isinstance(t, UMT5TextEncoder) and t.encode(["red"]).shape == (1, 8, 16)
    with pytest.raises(ValueError, match="'umt5', 'hash'"):
        build_text_encoder("clip")
    with pytest.raises(ValueError, match="needs a path"):
        build_text_encoder("umt5")
    assert isinstance(DecodeState(), DecodeState)


def test_one_text_dtype_rule(umt5_repo):
    """Training, precompute, a store's empty prompt and sampling build the text encoder without a dtype:
    umT5 on CUDA in bf16, everything else fp32 (one rule: encoders.text_dtype)."""
    from resampling_forcing.config import EncoderConfig
    from resampling_forcing.encoders import text_dtype

    assert text_dtype("umt5", "cuda") == text_dtype("umt5", torch.device("cuda:1")) == torch.bfloat16
    assert text_dtype("umt5", "cpu") == text_dtype("hash", "cuda") == text_dtype("hash", "cpu") == torch.float32
    assert build_text_encoder(EncoderConfig(text="umt5", text_path=str(umt5_repo), text_len=8)).dtype == torch.float32
    assert build_text_encoder("hash", dtype=torch.float64).dtype == torch.float64  # an explicit dtype wins
    repo = Path(__file__).resolve().parents[1]
    for f in ("resampling_forcing/training.py", "resampling_forcing/data/loader.py",
              "resampling_forcing/pipeline/loading.py", "train/precompute.py"):
        calls = [ln.split("#")[0] for ln in (repo / f).read_text().splitlines() if "build_text_encoder(" in ln and "import" not in ln]
        assert calls and all("dtype" not in ln for ln in calls), (f, calls)
