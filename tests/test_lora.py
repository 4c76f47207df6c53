"""LoRA fine-tuning (train.lora, resampling_forcing/lora.py): the merged weights equal the adapted model,
only the adapters train, a checkpoint is usable as any other, a resume is exact and refuses another base."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from resampling_forcing import lora
from resampling_forcing.checkpoint import EMA_WEIGHTS, LORA_WEIGHTS, list_checkpoints
from resampling_forcing.config import ConfigError, LoraConfig, ModelConfig, load_config, resolve_model
from resampling_forcing.config_checks import validate
from resampling_forcing.models.loading import CheckpointError, load_model, read_state_dict
from resampling_forcing.models.wan import CausalWanModel
from resampling_forcing.training import Trainer, train
from test_training import sigterm_after_step, sigterm_in_micro_batch
from train_helpers import TINY_YAML, read_log, small_overrides
from train_helpers import fresh_accelerate_state, synth  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _reset_accelerate():
    """Forget accelerate's process-wide state between two trainings within one test."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def _model(seed=0, **sizes) -> CausalWanModel:
    torch.manual_seed(seed)
    cfg = resolve_model(ModelConfig(preset="tiny", chunk_frames=1, **sizes))
    return CausalWanModel(cfg).eval()


def _randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if lora.is_adapter(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _inputs(model, frames=3, h=6, w=10, batch=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    c = model.cfg
    x = torch.randn(batch, c.in_channels, frames, h, w, generator=g)
    t = torch.rand(batch, frames, generator=g)
    ctx = torch.randn(batch, 5, c.text_dim, generator=g)
    return x, t, ctx


@pytest.mark.parametrize("rank,alpha,targets", [(4, None, None), (3, 7.0, ["q", "ffn.2"]), (1, 0.5, ["self_attn.o"])])
def test_merged_weights_compute_what_the_adapted_model_computes(rank, alpha, targets):
    """The reference twin: peft's adapted forward (base + scale B A x in every targeted layer) against the
    plain model loaded with merged_state; odd token grid (6x10 latents, 3 frames), two samples."""
    cfg = LoraConfig(rank=rank, alpha=alpha, targets=targets or list(LoraConfig().targets))
    base = _model()
    plain_before = {k: v.clone() for k, v in base.state_dict().items()}
    wrapped = _model()
    lora.add_adapters(wrapped, cfg)
    x, t, ctx = _inputs(base)
    with torch.no_grad():
        assert torch.equal(wrapped(x, t, ctx), base(x, t, ctx))  # B = 0 at the start: the base model exactly
    _randomize_adapters(wrapped)
    merged = lora.merged_state(wrapped.state_dict(), cfg)
    assert set(merged) == set(plain_before)
    changed = {k for k in merged if not torch.equal(merged[k], plain_before[k])}
    assert changed and all(any(lora._matches(k[: -len(".weight")], t) for t in cfg.targets) for k in changed)
    plain = _model()
    plain.load_state_dict(merged)
    with torch.no_grad():
        ref, got = wrapped(x, t, ctx), plain(x, t, ctx)
    assert not torch.allclose(ref, base(x, t, ctx), atol=1e-3)  # the adapters do something
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_merge_agrees_with_peft_own_merge():
    """merged_state's W + (alpha / r) B A against peft's in-place merge of each layer."""
    cfg = LoraConfig(rank=2, alpha=5.0)
    wrapped = _model()
    lora.add_adapters(wrapped, cfg)
    _randomize_adapters(wrapped)
    ours = lora.merged_state(wrapped.state_dict(), cfg)
    from peft.tuners.lora import LoraLayer

    for module in wrapped.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    theirs = {k.replace(".base_layer.", "."): v for k, v in wrapped.state_dict().items() if not lora.is_adapter(k)}
    assert set(ours) == set(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-6)


def test_only_the_adapters_get_gradients():
    wrapped = _model()
    lora.add_adapters(wrapped, LoraConfig(rank=2, targets=["q", "v"]))
    _randomize_adapters(wrapped)
    x, t, ctx = _inputs(wrapped)
    wrapped(x, t, ctx).square().mean().backward()
    for name, p in wrapped.named_parameters():
        assert (p.grad is not None) == lora.is_adapter(name), name
        assert p.requires_grad == lora.is_adapter(name)
    n = sum(p.numel() for n_, p in wrapped.named_parameters() if lora.is_adapter(n_))
    c = wrapped.cfg
    assert n == c.num_layers * 2 * 2 * (2 * c.dim * 2)  # blocks x {self, cross} x {q, v} x (A + B)
    # the memory estimate's count (a meta-device model, before anything loads) is what training holds
    from resampling_forcing.memory import trained_params

    cfg = load_config(TINY_YAML, ["train.lora.rank=2", "train.lora.targets=[q, v]", "train.init_from=x"])
    cfg.model = c
    assert trained_params(cfg) == n
    plain = _model()
    lora.add_adapters(plain, LoraConfig(rank=4))
    cfg.train.lora = LoraConfig(rank=4)
    assert trained_params(cfg) == sum(p.numel() for n_, p in plain.named_parameters() if lora.is_adapter(n_))


def test_load_merged_into_the_adapted_model_gives_the_plain_function():
    cfg = LoraConfig(rank=3)
    wrapped = _model()
    lora.add_adapters(wrapped, cfg)
    _randomize_adapters(wrapped)
    other = _model(seed=5)
    lora.load_merged_into(wrapped, other.state_dict())
    x, t, ctx = _inputs(other)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x, t, ctx), other(x, t, ctx), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("target,what", [("qq", "names no linear layer"), ("head", "also names head (Head)"),
                                         ("0", "also names ")])
def test_bad_target_is_one_line(target, what):
    """Also a name that matches a linear layer AND another module (peft refused those after the data and
    encoders had loaded, in four lines)."""
    with pytest.raises(ConfigError) as e:
        lora.check_model_targets(resolve_model(ModelConfig(preset="tiny")), ["q", target])
    msg = str(e.value)
    assert msg.startswith(f"train.lora.targets: {target!r} {what}") and "self_attn.q" in msg and "\n" not in msg


def test_config_rules(tmp_path):
    cfg = load_config(TINY_YAML, ["train.lora.rank=4"])
    validate(cfg)  # sampling a LoRA run's config needs no base
    with pytest.raises(ConfigError, match="train.lora.rank=4 adapts the weights of train.init_from"):
        validate(cfg, training=True)
    for bad, match in (("train.lora.rank=-1", "train.lora.rank=-1: must be >= 0"),
                       ("train.lora.targets=[]", "need distinct"), ("train.lora.targets=[q, q]", "need distinct"),
                       ("train.lora.dropout=1.0", "train.lora.dropout"),
                       ("train.lora.alpha=0", "train.lora.alpha"), ("train.lora.rnk=2", "rnk")):
        with pytest.raises(ConfigError, match=match):
            load_config(TINY_YAML, [bad])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, synth):
    """A short teacher-forcing run with an EMA: the base the LoRA runs adapt (from its model weights)."""
    run = tmp_path_factory.mktemp("base")
    train(load_config(TINY_YAML, small_overrides(run, synth, steps_tf=2, steps_rf=0) + ["train.ema_decay=0.5"]))
    _reset_accelerate()
    return run


def _lora_cfg(run, synth, base, *extra, rank=4):
    return load_config(TINY_YAML, small_overrides(run, synth, steps_tf=1, steps_rf=3) + [
        f"train.init_from={base}", f"train.lora.rank={rank}", "train.lora.alpha=8", "train.ema_decay=0.5",
        "train.save_every=100", *extra])


def test_lora_run_writes_merged_weights_and_resumes_exactly(tmp_path, synth, base_run, monkeypatch):
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    out = train(_lora_cfg(ref_run, synth, base_run))
    assert out["status"] == "completed"
    ckpt = list_checkpoints(ref_run)[-1][1]
    base_ckpt = list_checkpoints(base_run)[-1][1]
    base = read_state_dict(base_ckpt)
    merged = read_state_dict(ckpt)
    adapters, ema, meta = lora.read_adapters(ckpt / LORA_WEIGHTS)
    assert set(merged) == set(base) and adapters and set(ema) == set(adapters)
    assert meta["base"]["fingerprint"] == lora.fingerprint(base) and meta["lora"]["rank"] == 4
    # the checkpoint is a plain model (sampling, init_from): base + scale B A, untargeted weights untouched
    cfg = LoraConfig(rank=4, alpha=8.0)
    rebuilt = load_model(base_ckpt)
    lora.add_adapters(rebuilt, cfg)
    lora.load_adapters(rebuilt, adapters, "the adapters")
    expect = lora.merged_state(rebuilt.state_dict(), cfg)
    assert all(torch.equal(merged[k], expect[k]) for k in merged)
    assert torch.equal(merged["head.head.weight"], base["head.head.weight"])
    assert any(not torch.equal(merged[k], base[k]) for k in merged)
    ema_merged = load_file(str(ckpt / EMA_WEIGHTS))
    assert set(ema_merged) == set(base) and any(not torch.equal(ema_merged[k], merged[k]) for k in merged)
    model = load_model(ckpt)  # what the sampler does
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in base.values())

    original = sigterm_after_step(monkeypatch, 2)
    assert train(_lora_cfg(run, synth, base_run))["step"] == 2
    monkeypatch.setattr(Trainer, "train_step", original)
    assert train(_lora_cfg(run, synth, base_run))["status"] == "completed"
    assert [r["loss"] for r in read_log(run)] == [r["loss"] for r in read_log(ref_run)]
    got = list_checkpoints(run)[-1][1]
    for name in (LORA_WEIGHTS, EMA_WEIGHTS, "model.safetensors"):
        a, b = load_file(str(ckpt / name)), load_file(str(got / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def _stopped_lora_run(tmp_path, synth, monkeypatch, **base_overrides):
    """A one-step base run of its own (tmp_path/base) and a LoRA run on it stopped after step 1."""
    base, run = tmp_path / "base", tmp_path / "run"
    train(load_config(TINY_YAML, small_overrides(base, synth, steps_tf=1, steps_rf=0, **base_overrides)))
    _reset_accelerate()
    sigterm_after_step(monkeypatch, 1)
    train(_lora_cfg(run, synth, base))
    monkeypatch.undo()
    _reset_accelerate()
    return base, run


def test_stop_within_a_step_resumes_exactly_with_adapter_dropout(tmp_path, synth, base_run, monkeypatch):
    """A signal within an accumulating step drops the step; LoRA dropout had drawn its masks from the
    global RNG meanwhile, and the checkpoint saved that advanced state: the redone step drew other masks."""
    args = ("train.lora.dropout=0.5", "train.grad_accum=3")
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    train(_lora_cfg(ref_run, synth, base_run, *args))
    _reset_accelerate()
    calls, original = sigterm_in_micro_batch(monkeypatch, 2, 2)  # the 2nd micro-batch of step 3
    assert train(_lora_cfg(run, synth, base_run, *args))["step"] == 2 and calls.count(2) == 2  # within the step
    _reset_accelerate()
    monkeypatch.setattr(Trainer, "compute_loss", original)
    assert train(_lora_cfg(run, synth, base_run, *args))["step"] == 4
    assert [r["loss"] for r in read_log(run)] == [r["loss"] for r in read_log(ref_run)]  # exact, step for step


def test_resume_refuses_another_base_or_rank(tmp_path, synth, monkeypatch):
    base, run = _stopped_lora_run(tmp_path, synth, monkeypatch)
    with pytest.raises(ConfigError, match="train.lora.rank is 2 but the checkpoint"):
        Trainer(_lora_cfg(run, synth, base, rank=2))
    other = tmp_path / "other_base"
    train(load_config(TINY_YAML, small_overrides(other, synth, steps_tf=1, steps_rf=0, **{"train.seed": 7})))
    _reset_accelerate()
    recorded = list_checkpoints(base)[-1][1] / "model.safetensors"
    original = recorded.read_bytes()
    recorded.write_bytes((list_checkpoints(other)[-1][1] / "model.safetensors").read_bytes())  # changed in place
    with pytest.raises(CheckpointError, match="are not those these adapters were trained on"):
        Trainer(_lora_cfg(run, synth, base))
    _reset_accelerate()
    recorded.write_bytes(original)
    import shutil

    shutil.rmtree(base)  # gone: train.init_from is read instead, and must be the same weights
    with pytest.raises(CheckpointError, match="are not those these adapters were trained on"):
        Trainer(_lora_cfg(run, synth, other))


def test_lora_needs_its_adapter_file_to_resume(tmp_path, synth, base_run, monkeypatch):
    run = tmp_path / "run"
    sigterm_after_step(monkeypatch, 1)
    train(_lora_cfg(run, synth, base_run))
    monkeypatch.undo()
    (list_checkpoints(run)[-1][1] / LORA_WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="lora.safetensors is missing"):
        Trainer(_lora_cfg(run, synth, base_run))


def test_optimizer_and_ema_hold_only_the_adapters(tmp_path, synth, base_run):
    trainer = Trainer(_lora_cfg(tmp_path / "run", synth, base_run))
    assert trainer.ema is not None and all(lora.is_adapter(k) for k in trainer.ema.state_dict())
    groups = trainer.optimizer.optimizer.param_groups  # accelerate's wrapper around AdamW
    assert sum(p.numel() for g in groups for p in g["params"]) == trainer.lora.trained


def test_gradient_checkpointing_keeps_the_adapter_gradients():
    """With a frozen base no block input requires grad; a reentrant checkpoint would then drop every
    adapter gradient. Checkpointed and plain backward passes must agree."""
    grads = []
    for ckpt in (False, True):
        m = _model(gradient_checkpointing=ckpt).train()
        lora.add_adapters(m, LoraConfig(rank=2))
        _randomize_adapters(m)
        x, t, ctx = _inputs(m)
        m(x, t, ctx).square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert grads[1][n] is not None and grads[0][n].abs().sum() > 0, n
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- sampling with --lora


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, synth, base_run):
    run = tmp_path_factory.mktemp("lora_run")
    train(_lora_cfg(run, synth, base_run))
    _reset_accelerate()
    return run


@pytest.mark.parametrize("use_ema,weights", [(True, EMA_WEIGHTS), (False, "model.safetensors")])
def test_merge_file_rebuilds_the_runs_merged_weights(base_run, lora_run, use_ema, weights):
    """Base + the adapter file (sampling's --lora) is bit for bit what the LoRA run exported itself."""
    base = read_state_dict(list_checkpoints(base_run)[-1][1])
    merged, applied = lora.merge_file(base, lora_run, use_ema=use_ema)
    exported = load_file(str(list_checkpoints(lora_run)[-1][1] / weights))
    assert merged.keys() == exported.keys() and all(torch.equal(merged[k], exported[k]) for k in merged)
    assert applied["base_matches"] and applied["ema"] == use_ema


def test_pipeline_with_lora_loads_the_merged_model(base_run, lora_run, caplog):
    from resampling_forcing.pipeline import Pipeline, PipelineError

    ref = Pipeline.from_pretrained(lora_run)
    pipe = Pipeline.from_pretrained(base_run, lora=lora_run)
    a, b = ref.model.state_dict(), pipe.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert pipe.source["lora"][0]["file"].endswith(LORA_WEIGHTS) and pipe.source["lora"][0]["base_matches"]
    with pytest.raises(PipelineError, match="whose weights already include it"):
        Pipeline.from_pretrained(lora_run, lora=lora_run)
    shared = _copy_of_adapters(lora_run)
    with caplog.at_level("WARNING"):  # onto other weights (here the merged ones): allowed, and said
        other = Pipeline.from_pretrained(lora_run, lora=shared)
    assert not other.source["lora"][0]["base_matches"] and "trained on other weights" in caplog.text


def _copy_of_adapters(lora_run):
    """The run's adapter file copied out of its checkpoint (so it is not 'the checkpoint's own')."""
    import shutil

    src = list_checkpoints(lora_run)[-1][1] / LORA_WEIGHTS
    dst = src.parent.parent.parent / "shared_adapters.safetensors"
    shutil.copy(src, dst)
    return dst


def test_adapters_of_another_model_are_refused_in_one_line(lora_run, base_run):
    other = _model(dim=64, num_heads=2).state_dict()
    with pytest.raises(CheckpointError, match="trained for (other model sizes|another model)"):
        lora.merge_file(other, lora_run)
    with pytest.raises(CheckpointError, match="holds no lora.safetensors"):
        lora.adapter_file(base_run)  # a run that trained every weight


def test_the_resampling_rollout_runs_without_adapter_dropout():
    """train.lora.dropout must not thin the model that builds the histories (nor draw from the global RNG):
    the history is the same whether training left the model in train or eval mode."""
    from resampling_forcing.resampling import DegradeSettings, degrade_history

    m = _model()
    lora.add_adapters(m, LoraConfig(rank=2, dropout=0.5))
    _randomize_adapters(m)
    x, _, ctx = _inputs(m, frames=4)
    settings = DegradeSettings(objective="resampling", shift=1.0, steps=2)
    out = []
    for mode in (True, True, False):
        m.train(mode)
        hist, _ = degrade_history(m, x, ctx, settings, generator=torch.Generator().manual_seed(3))
        out.append(hist)
        assert m.training == mode  # the mode training set is given back
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_resume_reads_the_base_it_was_trained_on_after_the_base_run_moved_on(tmp_path, synth, monkeypatch):
    """train.init_from naming a run: the base run writes a newer checkpoint while the LoRA run is stopped;
    the resume reads the recorded checkpoint, not the run's newest."""
    base, run = _stopped_lora_run(tmp_path, synth, monkeypatch, **{"train.save_every": 1})
    train(load_config(TINY_YAML, small_overrides(base, synth, steps_tf=2, steps_rf=0, **{"train.save_every": 1})))
    _reset_accelerate()
    assert len(list_checkpoints(base)) == 2
    assert train(_lora_cfg(run, synth, base))["status"] == "completed"


def test_sample_cli_with_lora_records_it(tmp_path, base_run, lora_run):
    import json

    from resampling_forcing import sampling_cli

    out = tmp_path / "v.mp4"
    assert sampling_cli.main(["--checkpoint", str(base_run), "--lora", str(lora_run), "--prompt", "a red circle",
                              "--num-chunks", "2", "--steps", "1", "--output", str(out), "--quiet"]) == 0
    source = json.loads(out.with_suffix(".json").read_text())["pipeline"]["source"]
    (rec,) = source["lora"]  # one record per --lora
    assert rec["base_matches"] and rec["ema"] and rec["file"].endswith(LORA_WEIGHTS) and rec["strength"] == 1.0
    assert source["weights"].endswith("model.safetensors")  # the base's model weights, not its EMA


def test_mixed_precision_holds_the_frozen_base_in_bf16(tmp_path, synth, base_run):
    """Under bf16 mixed precision (CPU autocast here) the frozen base is held in bf16, the adapters (and
    the optimizer) in fp32; the export merges onto the bf16-rounded base, in fp32."""
    from accelerate import Accelerator

    cfg = _lora_cfg(tmp_path / "run", synth, base_run, "train.mixed_precision=bf16")
    acc = Accelerator(cpu=True, mixed_precision="bf16", project_dir=cfg.train.run_dir,
                      gradient_accumulation_steps=cfg.train.grad_accum, step_scheduler_with_optimizer=False)
    trainer = Trainer(cfg, accelerator=acc)
    dtypes = {n: p.dtype for n, p in trainer.inner.named_parameters()}
    assert {d for n, d in dtypes.items() if lora.is_adapter(n)} == {torch.float32}
    assert {d for n, d in dtypes.items() if not lora.is_adapter(n)} == {torch.bfloat16}
    assert trainer.fit()["status"] == "completed"
    assert all(r["loss"] == r["loss"] for r in read_log(tmp_path / "run"))  # finite
    ckpt = list_checkpoints(tmp_path / "run")[-1][1]
    merged = read_state_dict(ckpt)
    base = read_state_dict(list_checkpoints(base_run)[-1][1])
    untouched = "head.head.weight"
    assert torch.equal(merged[untouched].float(), base[untouched].to(torch.bfloat16).float())
    assert merged["blocks.0.self_attn.q.weight"].dtype == torch.float32


def test_adapters_only_checkpoints_read_as_the_merged_ones(tmp_path, synth, base_run, lora_run, monkeypatch):
    """train.lora.merged_checkpoints false: a checkpoint keeps its adapters only (no model / EMA copies),
    and everything that reads it (read_state_dict: init_from, a resume's checks; the Pipeline: sampling)
    gets what the merged checkpoint of the same run holds, bit for bit; a resume is exact; a base that is
    gone is one line."""
    from resampling_forcing.checkpoint import resolve_checkpoint
    from resampling_forcing.models.loading import detect_layout, weight_files
    from resampling_forcing.pipeline import Pipeline, PipelineError

    run = tmp_path / "run"
    original = sigterm_after_step(monkeypatch, 2)
    assert train(_lora_cfg(run, synth, base_run, "train.lora.merged_checkpoints=false"))["step"] == 2
    monkeypatch.setattr(Trainer, "train_step", original)
    _reset_accelerate()
    assert train(_lora_cfg(run, synth, base_run, "train.lora.merged_checkpoints=false"))["status"] == "completed"
    _reset_accelerate()
    assert [r["loss"] for r in read_log(run)] == [r["loss"] for r in read_log(lora_run)]  # the exact resume
    ckpt, ref = list_checkpoints(run)[-1][1], list_checkpoints(lora_run)[-1][1]
    assert not (ckpt / "model.safetensors").exists() and not (ckpt / EMA_WEIGHTS).exists()
    base_ckpt = list_checkpoints(base_run)[-1][1]
    assert weight_files(*detect_layout(ckpt)) == [ckpt / LORA_WEIGHTS, base_ckpt / "model.safetensors"]  # preflight
    from resampling_forcing.ablation_eval import cache_key  # an ablation's eval cache keys on the base too

    key, base_file = cache_key(run), base_ckpt / "model.safetensors"
    st = base_file.stat()
    os.utime(base_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the base rewritten in place
    try:
        assert cache_key(run) != key
    finally:
        os.utime(base_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache_key(run) == key
    size = sum(f.stat().st_size for f in ckpt.rglob("*.safetensors"))
    assert size < (ref / "model.safetensors").stat().st_size  # adapters (+ EMA) only
    a, b = read_state_dict(ckpt), read_state_dict(ref)  # the model weights: init_from, the nonfinite check
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = resolve_checkpoint(run)
    assert info.weights == ckpt / LORA_WEIGHTS and info.ema and not resolve_checkpoint(run, use_ema=False).ema
    for use_ema in (True, False):  # sampling: the adapters' EMA merged, as the merged EMA copy
        got = Pipeline.from_pretrained(run, use_ema=use_ema)
        want = Pipeline.from_pretrained(lora_run, use_ema=use_ema)
        assert got.source["ema"] == use_ema == want.source["ema"]
        x, y = got.model.state_dict(), want.model.state_dict()
        assert all(torch.equal(x[k], y[k]) for k in x)
    from resampling_forcing.training_utils import resume_config_changes

    changes = resume_config_changes(ckpt, _lora_cfg(run, synth, base_run, "train.lora.merged_checkpoints=true"))
    assert any("merged_checkpoints" in c for c in changes)  # a resume may switch it (only what is written)
    # a next LoRA stage on it, adapters only too: its base is read by merging in turn
    stage2 = tmp_path / "stage2"
    assert train(_lora_cfg(stage2, synth, run, "train.lora.merged_checkpoints=false", rank=2))["status"] == "completed"
    _reset_accelerate()
    top = list_checkpoints(stage2)[-1][1]
    recorded = lora.read_adapters(top / LORA_WEIGHTS, tensors=False)[2]["base"]
    # the base's identity comes from its files (its adapters and its own base's print), not from merged bits,
    # which another machine's BLAS may round otherwise
    assert recorded["source"] == str(ckpt.absolute()) and recorded["fingerprint"] == lora.weights_identity(ckpt)
    on_top, _ = lora.merge_file(a, top, use_ema=False)
    assert all(torch.equal(on_top[k], v) for k, v in read_state_dict(top).items())
    assert weight_files(*detect_layout(top)) == [top / LORA_WEIGHTS, ckpt / LORA_WEIGHTS, base_ckpt / "model.safetensors"]
    # --lora of stage 2 onto stage 1 (adapters only): recognised as its base by identity, not merged bits
    assert Pipeline.from_pretrained(ckpt, lora=top).source["lora"][0]["base_matches"]
    # a recorded path that is gone: the checkpoints of the config's train.init_from are searched by identity
    real = lora._recorded_base
    monkeypatch.setattr(lora, "_recorded_base", lambda f: dict(real(f), source="/nonexistent/base"))
    assert lora.find_base(ckpt)[0] == base_ckpt and lora.base_source(ckpt, lambda: "unused") == str(base_ckpt)
    monkeypatch.setattr(lora, "_recorded_base", real)
    monkeypatch.setattr(lora, "find_base", lambda folder, read=True: (folder, None))  # bases that loop: one line
    with pytest.raises(CheckpointError, match="lead back to it"):
        lora.merged_weights(ckpt)
    monkeypatch.undo()
    moved = tmp_path / "moved_base"
    base_ckpt.rename(moved)
    try:
        with pytest.raises(PipelineError, match="keeps only LoRA adapters .* is not found: .*step_0000002 is gone"):
            Pipeline.from_pretrained(run)
    finally:
        moved.rename(base_ckpt)
    weights = base_ckpt / "model.safetensors"
    saved = weights.read_bytes()
    try:  # a damaged base is named as such, not as gone
        weights.write_bytes(saved[: len(saved) // 2])
        with pytest.raises(PipelineError, match=r"step_0000002 is unreadable \(cannot read"):
            Pipeline.from_pretrained(run)
    finally:
        weights.write_bytes(saved)


def test_has_ema_of_a_damaged_adapter_file_is_one_line(tmp_path):
    f = tmp_path / LORA_WEIGHTS
    f.write_bytes((16).to_bytes(8, "little") + b"{not json at all")
    with pytest.raises(CheckpointError, match="the file is damaged") as e:
        lora.has_ema(f)
    assert len(str(e.value).splitlines()) == 1
