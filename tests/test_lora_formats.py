"""Other tools' Wan2.1 LoRA files (lora_formats): the same update written with Wan's, diffusers' and kohya's
names merges to the same weights, which compute what the unmerged low-rank layers compute (peft's LoRA
layer for the linear ones, two convolutions for the patch embedding); diffs and bias diffs; strengths;
several LoRAs in order; one-line refusals; the sampling CLI and the Pipeline."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from resampling_forcing.lora_formats import lora_list, merge_updates, read_updates
from resampling_forcing.models.loading import CheckpointError
from resampling_forcing.pipeline import Pipeline, PipelineError
from helpers import load_sample_cli, save_checkpoint_for_tests, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
RANK = 3
# Wan name -> (diffusers name, kohya name)
NAMES = {
    "blocks.0.self_attn.q": ("blocks.0.attn1.to_q", "blocks_0_self_attn_q"),
    "blocks.1.cross_attn.o": ("blocks.1.attn2.to_out.0", "blocks_1_cross_attn_o"),
    "blocks.0.ffn.2": ("blocks.0.ffn.net.2", "blocks_0_ffn_2"),
    "head.head": ("proj_out", "head_head"),
    "patch_embedding": ("patch_embedding", "patch_embedding"),  # a conv: A [r, in, 1, 2, 2], B [out, r, 1, 1, 1]
}


def _factors(state, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in NAMES:
        w = state[name + ".weight"]
        tail = [1] * (w.dim() - 2)
        down = torch.randn(RANK, *w.shape[1:], generator=g) * 0.1
        up = torch.randn(w.shape[0], RANK, *tail, generator=g) * 0.1
        out[name] = (down, up)
    return out


def _write(path, factors, naming, alpha=6.0, extra=None):
    """One LoRA file of `factors` in a tool's naming (alpha 6 with rank 3: scale 2)."""
    t = {}
    for name, (down, up) in factors.items():
        diff_name, kohya_name = NAMES[name]
        if naming == "wan":  # Wan's release / ComfyUI: diffusion_model. prefix, lora_A/B, alpha
            key, a, b = f"diffusion_model.{name}", "lora_A.weight", "lora_B.weight"
        elif naming == "diffusers":  # transformer. prefix, diffusers names, no alpha: the scale baked into B
            key, a, b = f"transformer.{diff_name}", "lora_A.weight", "lora_B.weight"
        else:  # kohya / musubi-tuner
            key, a, b = f"lora_unet_{kohya_name}", "lora_down.weight", "lora_up.weight"
        t[f"{key}.{a}"] = down.contiguous()
        if naming == "diffusers":
            t[f"{key}.{b}"] = (up * (alpha / RANK)).contiguous()
        else:
            t[f"{key}.{b}"] = up.contiguous()
            t[f"{key}.alpha"] = torch.tensor(alpha)
    t.update(extra or {})
    save_file(t, str(path))
    return path


def test_three_namings_merge_alike_and_compute_the_low_rank_layers(tmp_path):
    from peft import LoraConfig as PeftConfig
    from peft import inject_adapter_in_model

    model = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    factors = _factors(state)
    merged = {n: merge_updates(state, _write(tmp_path / f"{n}.safetensors", factors, n))
              for n in ("wan", "diffusers", "kohya")}
    assert [m[1]["format"] for m in merged.values()] == ["wan", "diffusers", "kohya"]
    assert all(m[1]["modules"] == len(NAMES) for m in merged.values())
    ref = merged["wan"][0]
    for _, (other, _) in merged.items():
        for k in state:
            torch.testing.assert_close(other[k], ref[k].to(other[k].dtype), rtol=1e-6, atol=1e-6)
    untouched = [k for k in state if k.rsplit(".", 1)[0] not in NAMES]
    assert all(torch.equal(ref[k], state[k]) for k in untouched)
    # the linear layers: peft's unmerged LoRA layer (alpha 6, rank 3) on the same input
    linear = [n for n in NAMES if n != "patch_embedding"]
    inject_adapter_in_model(PeftConfig(r=RANK, lora_alpha=6.0, target_modules=linear, lora_dropout=0.0), model)
    modules = dict(model.named_modules())
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name in linear:
            layer = modules[name]
            layer.lora_A["default"].weight.copy_(factors[name][0])
            layer.lora_B["default"].weight.copy_(factors[name][1])
            xin = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(2))
            want = layer(xin)
            got = F.linear(xin, ref[name + ".weight"], ref[name + ".bias"])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the conv (patch embedding): conv with the merged kernel = conv + 2 * up(down(x))
    down, up = factors["patch_embedding"]
    w, b = state["patch_embedding.weight"], state["patch_embedding.bias"]
    stride = tuple(w.shape[2:])
    x = torch.randn(1, w.shape[1], 3, 4, 6, generator=torch.Generator().manual_seed(3))
    want = F.conv3d(x, w, b, stride=stride) + 2.0 * F.conv3d(F.conv3d(x, down, stride=stride), up)
    got = F.conv3d(x, ref["patch_embedding.weight"], b, stride=stride)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_diffs_strength_and_order(tmp_path):
    state = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    factors = _factors(state)
    g = torch.Generator().manual_seed(4)
    dn, db = torch.randn(32, generator=g), torch.randn(32, generator=g)
    extra = {"diffusion_model.blocks.0.norm3.diff": dn, "diffusion_model.blocks.0.self_attn.o.diff_b": db}
    f = _write(tmp_path / "d.safetensors", factors, "wan", extra=extra)
    one, _ = merge_updates(state, f)
    torch.testing.assert_close(one["blocks.0.norm3.weight"], state["blocks.0.norm3.weight"] + dn)
    torch.testing.assert_close(one["blocks.0.self_attn.o.bias"], state["blocks.0.self_attn.o.bias"] + db)
    zero, _ = merge_updates(state, f, strength=0.0)
    assert all(torch.equal(zero[k], state[k].float()) for k in state)
    half, _ = merge_updates(state, f, strength=0.5)
    for k in state:  # the update is linear in the strength
        torch.testing.assert_close(half[k] - state[k], 0.5 * (one[k] - state[k]), rtol=1e-5, atol=1e-6)
    twice, _ = merge_updates(one, f)
    dbl, _ = merge_updates(state, f, strength=2.0)
    for k in state:
        torch.testing.assert_close(twice[k], dbl[k], rtol=1e-5, atol=1e-6)


def test_modulation_differences(tmp_path):
    """Distillation LoRAs change the modulation tables: lightx2v's `diff_m`, a `modulation.diff`, diffusers'
    `scale_shift_table.diff` (its name for them)."""
    state = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    g = torch.Generator().manual_seed(5)
    d0, d1, dh = (torch.randn(state[k].shape, generator=g) for k in
                  ("blocks.0.modulation", "blocks.1.modulation", "head.modulation"))
    wan = _write(tmp_path / "m.safetensors", {}, "wan", extra={
        "diffusion_model.blocks.0.diff_m": d0, "diffusion_model.blocks.1.modulation.diff": d1,
        "diffusion_model.head.diff_m": dh})
    out, rec = merge_updates(state, wan)
    for k, d in (("blocks.0.modulation", d0), ("blocks.1.modulation", d1), ("head.modulation", dh)):
        torch.testing.assert_close(out[k], state[k] + d)
    factors = {"blocks.0.self_attn.q": _factors(state)["blocks.0.self_attn.q"]}
    diff = _write(tmp_path / "dm.safetensors", factors, "diffusers", extra={
        "transformer.blocks.1.scale_shift_table.diff": d1, "transformer.scale_shift_table.diff": dh})
    out, rec = merge_updates(state, diff)
    assert rec["format"] == "diffusers"
    torch.testing.assert_close(out["blocks.1.modulation"], state["blocks.1.modulation"] + d1)
    torch.testing.assert_close(out["head.modulation"], state["head.modulation"] + dh)


def test_peft_header_alpha_and_kohya_alpha_zero(tmp_path):
    """diffusers / peft keep alpha in the header (lora_adapter_metadata), not as tensors: the same merge as
    the alpha tensors give; use_rslora scales by alpha / sqrt(rank); kohya's alpha 0 means scale 1."""
    state = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    factors = _factors(state)
    want, _ = merge_updates(state, _write(tmp_path / "w.safetensors", factors, "wan", alpha=6.0))

    def header(name, cfg, scale_b=1.0):
        t = {f"transformer.{NAMES[n][0]}.lora_A.weight": d.contiguous() for n, (d, u) in factors.items()}
        t.update({f"transformer.{NAMES[n][0]}.lora_B.weight": (u * scale_b).contiguous() for n, (d, u) in factors.items()})
        save_file(t, str(tmp_path / name), metadata={"lora_adapter_metadata": json.dumps(cfg)})
        return tmp_path / name

    got, _ = merge_updates(state, header("h.safetensors", {"transformer.r": RANK, "transformer.lora_alpha": 6.0}))
    rs, _ = merge_updates(state, header("rs.safetensors", {"transformer.r": RANK, "transformer.lora_alpha": 6.0,
                                                            "transformer.use_rslora": True}, scale_b=RANK ** 0.5 / RANK))
    for k in state:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rs[k], want[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(CheckpointError, match="rank_pattern"):
        merge_updates(state, header("p.safetensors", {"transformer.r": 3, "transformer.rank_pattern": {"q": 2}}))
    zero, _ = merge_updates(state, _write(tmp_path / "z.safetensors", factors, "kohya", alpha=0.0))
    one, _ = merge_updates(state, _write(tmp_path / "o.safetensors", factors, "kohya", alpha=float(RANK)))
    assert all(torch.equal(zero[k], one[k]) for k in state)


def _bad(tmp_path, tensors, name="bad.safetensors"):
    save_file(tensors, str(tmp_path / name))
    return tmp_path / name


@pytest.mark.parametrize("tensors,message", [
    ({"diffusion_model.blocks.0.self_attn.q.hada_w1_a": torch.ones(2, 32)}, "LoHa"),
    ({"lora_unet_blocks_0_self_attn_q.lokr_w1": torch.ones(2, 2)}, "LoKr"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.ones(2, 32)}, "no up half"),
    ({"diffusion_model.blocks.0.self_attn.q.weight": torch.ones(32, 32)}, "not a LoRA key"),
    ({"diffusion_model.blocks.9.self_attn.q.lora_A.weight": torch.ones(2, 32),
      "diffusion_model.blocks.9.self_attn.q.lora_B.weight": torch.ones(32, 2)}, "which this model has not"),
    ({"lora_unet_blocks_0_cross_attn_k_img.lora_down.weight": torch.ones(2, 32),
      "lora_unet_blocks_0_cross_attn_k_img.lora_up.weight": torch.ones(32, 2)}, "names a module this model has not"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.ones(2, 64),
      "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.ones(32, 2)}, "does not fit its [32, 32] weight"),
    ({"diffusion_model.blocks.0.self_attn.q.diff_b": torch.ones(7)}, "difference for blocks.0.self_attn.q.bias"),
    ({"diffusion_model.blocks.0.self_attn.q.diff_b": torch.ones(32),
      "diffusion_model.blocks.0.self_attn.q.lora_B.bias": torch.ones(32)}, "is a second diff_b"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.ones(2, 32),
      "blocks.0.self_attn.q.lora_down.weight": torch.ones(2, 32)}, "is a second down"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.ones(2, 32),
      "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.ones(32, 2),
      "diffusion_model.blocks.0.self_attn.q.alpha": torch.ones(2)}, "an alpha is one number"),
    ({"diffusion_model.patch_embedding.lora_A.weight": torch.ones(2, 4, 1, 2, 2),
      "diffusion_model.patch_embedding.lora_B.weight": torch.ones(32, 2, 1, 2, 2)}, "does not fit its"),
    ({"diffusion_model.blocks.0.norm9.diff": torch.ones(32)}, "changes blocks.0.norm9, which this model has not"),
])
def test_refusals_are_one_line(tmp_path, tensors, message):
    state = tiny_model().state_dict()
    with pytest.raises(CheckpointError) as e:
        merge_updates(state, _bad(tmp_path, tensors))
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1


def test_lora_list_rule():
    assert lora_list(None) == [] and lora_list("a") == [("a", 1.0)]
    assert lora_list(["a", "b"], 0.5) == [("a", 0.5), ("b", 0.5)]
    assert lora_list(["a", "b"], [0.5, 2]) == [("a", 0.5), ("b", 2.0)]
    for lora, scale, msg in ((["a", "b"], [1, 2, 3], "3 LoRA scales for 2"), (None, 1.0, "without lora"),
                             ("a", float("nan"), "a number"), ("a", True, "a number"), ([], None, "give a LoRA file"),
                             (5, None, "give a LoRA file")):
        with pytest.raises(ValueError, match=msg):
            lora_list(lora, scale)


def test_header_only_read_checks_keys(tmp_path):
    state = tiny_model().state_dict()
    f = _write(tmp_path / "k.safetensors", _factors(state), "kohya")
    updates, naming = read_updates(f, tensors=False)
    assert naming == "kohya" and len(updates) == len(NAMES) and all(u.down is None for u in updates.values())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return save_checkpoint_for_tests(tmp_path_factory.mktemp("run"), step=10)


def test_a_foreign_lora_goes_onto_the_ema_weights(tmp_path):
    """Another tool's LoRA changes nothing about which weights load (the EMA when there); only a LoRA run of
    this toolkit asks for the model weights it was trained on. Strength 0: exactly the plain load."""
    ckpt = save_checkpoint_for_tests(tmp_path / "e", ema=True)
    plain = Pipeline.from_pretrained(ckpt)
    f = _write(tmp_path / "s.safetensors", _factors(plain.model.state_dict()), "wan")
    off = Pipeline.from_pretrained(ckpt, lora=f, lora_scale=0.0)
    assert plain.source["ema"] and off.source["ema"]
    assert all(torch.equal(v, off.model.state_dict()[k]) for k, v in plain.model.state_dict().items())


def test_pipeline_and_cli_merge_a_foreign_lora(run_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    base = Pipeline.from_pretrained(run_dir)
    state = {k: v.clone() for k, v in base.model.state_dict().items()}
    f = _write(tmp_path / "style.safetensors", _factors(state), "diffusers")
    pipe = Pipeline.from_pretrained(run_dir, lora=[f, f], lora_scale=[1.0, -1.0])  # and back: the base
    for k, v in pipe.model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=1e-6)
    rec = pipe.source["lora"]
    assert [r["strength"] for r in rec] == [1.0, -1.0] and rec[0]["format"] == "diffusers"
    merged = Pipeline.from_pretrained(run_dir, lora=f, lora_scale=0.5).model.state_dict()
    want, _ = merge_updates(load_file(str(next(run_dir.rglob("model.safetensors")))), f, 0.5)
    assert all(torch.equal(merged[k], want[k].to(merged[k].dtype)) for k in merged)
    with pytest.raises(PipelineError, match="2 LoRA scales for 1"):
        Pipeline.from_pretrained(run_dir, lora=f, lora_scale=[1, 2])
    cli = load_sample_cli()
    out = tmp_path / "v.mp4"
    args = ["--checkpoint", str(run_dir), "--prompt", "a", "--num-chunks", "1", "--device", "cpu", "--quiet"]
    assert cli.main(args + ["--lora", str(f), "--lora-scale", "0.5", "--output", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["pipeline"]["source"]["lora"][0]["strength"] == 0.5
    capsys.readouterr()
    bad = _bad(tmp_path, {"diffusion_model.blocks.0.self_attn.q.hada_w1_a": torch.ones(2, 32)})
    for extra, msg in ((["--lora", str(bad)], "LoHa"), (["--lora", str(f), "--lora-scale", "1", "--lora-scale", "2",
                                                           "--lora-scale", "3"], "3 LoRA scales for 1"),
                       (["--lora-scale", "2"], "without lora")):
        assert cli.main(args + extra + ["--output", str(tmp_path / "x.mp4")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err, err
    assert not (tmp_path / "x.mp4").exists()
