"""The training loop in-process (single process, CPU): objective stages, logs, checkpoints, exact
resume after a signal, NaN handling, atomic checkpoints, and one-line config errors."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal

import pytest
import torch
import yaml

from resampling_forcing.checkpoint import STATE_FILE, list_checkpoints, read_trainer_state
from resampling_forcing.config import Config, ConfigError, StageConfig, config_from_dict, load_config
from resampling_forcing.models.loading import CheckpointError, load_model
from resampling_forcing.training import Trainer, TrainingAborted, lr_at, ramp_at, stage_at, train, train_lr
from train_helpers import REPO, TINY_YAML, read_log, small_overrides
from train_helpers import fresh_accelerate_state, synth  # noqa: F401 (fixtures)


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def cfg_for(run_dir, synth, *extra, **kw):
    return load_config(TINY_YAML, small_overrides(run_dir, synth, **kw) + list(extra))


def sigterm_after_step(monkeypatch, step: int):
    """Make the trainer send itself SIGTERM after training step `step` (handled: it finishes the step,
    saves, returns); returns the original train_step, to put back for the resumed run."""
    original = Trainer.train_step

    def step_then_signal(self, stop=None):
        rec = original(self, stop)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return rec

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    return original


def sigterm_in_micro_batch(monkeypatch, steps_done: int, nth: int) -> tuple[list, object]:
    """Make the trainer send itself SIGTERM in the `nth` micro-batch of the step after `steps_done` steps
    (a stop within an accumulating step); returns (the steps of every micro-batch computed, the original
    compute_loss to put back for the resumed run)."""
    original, calls = Trainer.compute_loss, []

    def signal_in_step(self, batch, stage, gen):
        calls.append(self.step)
        if self.step == steps_done and calls.count(steps_done) == nth:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, stage, gen)

    monkeypatch.setattr(Trainer, "compute_loss", signal_in_step)
    return calls, original


def test_stage_schedule_and_lr():
    cfg = Config()
    cfg.train.stages = [StageConfig(name="tf", steps=3), StageConfig(name="rf", objective="resampling", steps=2)]
    assert [stage_at(cfg, s)[1].name for s in range(5)] == ["tf", "tf", "tf", "rf", "rf"]
    assert lr_at(0, 1.0, 4) == 0.25 and lr_at(3, 1.0, 4) == 1.0 and lr_at(100, 1.0, 4) == 1.0
    assert lr_at(0, 1.0, 0) == 1.0
    # cosine: full lr at the end of warmup, min_ratio at the last step, the midpoint halfway between
    assert lr_at(3, 1.0, 4, total=14, schedule="cosine", min_ratio=0.1) == 1.0  # last warmup step
    assert lr_at(4, 1.0, 4, total=14, schedule="cosine", min_ratio=0.1) == pytest.approx(1.0)
    assert lr_at(13, 1.0, 4, total=14, schedule="cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(8.5, 1.0, 4, total=14, schedule="cosine", min_ratio=0.1) == pytest.approx(0.55)
    assert lr_at(99, 1.0, 4, total=14, schedule="cosine", min_ratio=0.1) == pytest.approx(0.1)
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.lr_schedule, cfg.train.min_lr_ratio = 2.0, 0, "cosine", 0.0
    assert train_lr(cfg, 0) == 2.0 and train_lr(cfg, 4) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule"):
        lr_at(5, 1.0, 0, total=10, schedule="linear")


def test_fixed_batch_loss_decreases_and_run_dir_layout(tmp_path, synth):
    run = tmp_path / "run"
    cfg = cfg_for(run, synth, "data.fixed_batch=true", "train.ema_decay=0.9", "train.keep_last=2",
                  "train.save_every=2", steps_tf=4, steps_rf=4)
    result = train(cfg)
    assert result["status"] == "completed" and result["step"] == 8
    log = read_log(run)
    assert [r["step"] for r in log] == list(range(1, 9))
    assert [r["objective"] for r in log] == ["teacher_forcing"] * 4 + ["resampling"] * 4  # hard switch
    assert all(len(r["loss_chunk"]) == 4 and r["tokens_per_s"] > 0 and r["step_time"] > 0 for r in log)
    assert all("t_s_mean" in r for r in log[4:]) and not any("t_s_mean" in r for r in log[:4])
    losses = [r["loss"] for r in log]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    # rotation keeps the last 2; each checkpoint is complete and readable by the sampler's loader
    ckpts = list_checkpoints(run)
    assert [s for s, _ in ckpts] == [6, 8]
    for step, path in ckpts:
        names = {p.name for p in path.iterdir()}
        assert {"model.safetensors", "model_config.json", "ema.safetensors", "config.yaml", "trainer_state.json",
                "optimizer.bin", "random_states_0.pkl"} <= names
        state = read_trainer_state(path)
        assert state["step"] == step and state["data_position"] == step
        model = load_model(path)
        assert model.cfg.dim == 32 and model.cfg.chunk_frames == 2
        back = config_from_dict(yaml.safe_load((path / "config.yaml").read_text()))
        assert back.train.stages[1].objective == "resampling"
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())
    assert (run / "config.yaml").is_file() and any((run / "tb").rglob("events.out.tfevents*"))


def test_resume_refuses_changed_model_or_encoders(tmp_path, synth, caplog):
    run = tmp_path / "run"
    assert train(cfg_for(run, synth, steps_tf=1, steps_rf=1))["step"] == 2
    before = (run / "config.yaml").read_text()
    for change in ("encoders.text_ngram=3", "model.prediction=x0"):
        with pytest.raises(ConfigError, match=change.split("=")[0].replace(".", r"\.") + " is .* but the checkpoint"):
            train(cfg_for(run, synth, change, steps_tf=1, steps_rf=1))
        assert (run / "config.yaml").read_text() == before  # nothing rewritten by a refused resume
    # other settings may change (more steps, another LR, gradient checkpointing): resumed, changes logged
    with caplog.at_level("WARNING", logger="resampling_forcing.train"):
        res = train(cfg_for(run, synth, "train.lr=0.001", "model.gradient_checkpointing=true", steps_tf=1, steps_rf=2))
    assert res["status"] == "completed" and res["step"] == 3
    assert "train.lr: 0.003 -> 0.001" in caplog.text and "model.gradient_checkpointing: False -> True" in caplog.text


def test_resume_after_sigterm_matches_uninterrupted_run(tmp_path, synth, monkeypatch):
    """Model, EMA, optimizer, step and RNG come back: the losses, the weights and the EMA weights of the
    resumed run equal the uninterrupted run's, bit for bit."""
    from safetensors.torch import load_file

    from resampling_forcing.checkpoint import EMA_WEIGHTS

    args = ("train.save_every=100", "train.ema_decay=0.9")
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    train(cfg_for(ref_run, synth, *args, steps_tf=2, steps_rf=4))
    ref = read_log(ref_run)

    original = sigterm_after_step(monkeypatch, 3)
    first = train(cfg_for(run, synth, *args, steps_tf=2, steps_rf=4))
    assert first["status"] == "interrupted" and first["step"] == 3
    assert [s for s, _ in list_checkpoints(run)] == [3]
    monkeypatch.setattr(Trainer, "train_step", original)
    second = train(cfg_for(run, synth, *args, steps_tf=2, steps_rf=4))
    assert second["status"] == "completed" and second["step"] == 6
    got = read_log(run)
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]  # exact, step for step
    assert [r["loss_chunk"] for r in got] == [r["loss_chunk"] for r in ref]
    a = load_model(list_checkpoints(ref_run)[-1][1]).state_dict()
    b = load_model(list_checkpoints(run)[-1][1]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema_a, ema_b = (load_file(str(list_checkpoints(r)[-1][1] / EMA_WEIGHTS)) for r in (ref_run, run))
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert any(not torch.equal(ema_a[k], a[k]) for k in ema_a if k in a)  # the EMA is not the weights
    # an explicit resume_from (another run's checkpoint) continues from there into a new run dir
    third = train(cfg_for(tmp_path / "branch", synth, *args, f"train.resume_from={run}/checkpoints/step_0000003",
                          steps_tf=2, steps_rf=4))
    assert third["step"] == 6
    assert [r["loss"] for r in read_log(tmp_path / "branch")] == [r["loss"] for r in ref[3:]]
    # the same command again (more steps) continues the branch's own step 6, not its starting point
    branch_log = read_log(tmp_path / "branch")
    fourth = train(cfg_for(tmp_path / "branch", synth, *args, f"train.resume_from={run}/checkpoints/step_0000003",
                           steps_tf=2, steps_rf=5))
    assert fourth["step"] == 7 and read_log(tmp_path / "branch")[:3] == branch_log  # steps 4-6 not redone (wall times)
    # a run dir whose checkpoints started elsewhere is refused, not silently rewound
    with pytest.raises(CheckpointError, match="did not start from train.resume_from"):
        train(cfg_for(run, synth, *args, f"train.resume_from={run}/checkpoints/step_0000003", steps_tf=2, steps_rf=5))
    assert [s for s, _ in list_checkpoints(run)] == [3, 6]


def test_sigterm_within_a_step_drops_it_and_resumes_exactly(tmp_path, synth, monkeypatch):
    """A signal during a micro-batch of an accumulating step stops at once (a launcher kills its workers
    30 s after a signal: a whole step and then a checkpoint may not fit): the step is dropped, the
    checkpoint is the state before it, and the resumed run equals an uninterrupted one."""
    args = ("train.save_every=100", "train.grad_accum=3")
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    train(cfg_for(ref_run, synth, *args, steps_tf=2, steps_rf=3))
    ref = read_log(ref_run)
    calls, original = sigterm_in_micro_batch(monkeypatch, 3, 2)  # the 2nd micro-batch of step 4
    first = train(cfg_for(run, synth, *args, steps_tf=2, steps_rf=3))
    assert first["status"] == "interrupted" and first["step"] == 3
    assert calls.count(3) == 2  # stopped within the step, not after its 3 micro-batches
    assert [s for s, _ in list_checkpoints(run)] == [3] and len(read_log(run)) == 3
    assert read_trainer_state(list_checkpoints(run)[-1][1])["data_position"] == 9
    monkeypatch.setattr(Trainer, "compute_loss", original)
    second = train(cfg_for(run, synth, *args, steps_tf=2, steps_rf=3))
    assert second["status"] == "completed" and second["step"] == 5
    assert [r["loss"] for r in read_log(run)] == [r["loss"] for r in ref]  # exact, step for step
    a = load_model(list_checkpoints(ref_run)[-1][1]).state_dict()
    b = load_model(list_checkpoints(run)[-1][1]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("written, deepspeed_dir, launch, refused", [
    ("DDP / one process", False, "DeepSpeed ZeRO-2", True),   # DeepSpeed's loader asserted inside
    ("DeepSpeed ZeRO-2", True, "DDP / one process", True),    # FileNotFoundError: optimizer.bin
    ("DeepSpeed ZeRO-2", True, "DeepSpeed ZeRO-3", True),
    ("DeepSpeed ZeRO-2", True, "DeepSpeed ZeRO-2", False),
    (None, True, "DDP / one process", True),                  # before the engine was recorded
    (None, False, "DeepSpeed ZeRO-2", True),
    (None, True, "DeepSpeed ZeRO-3", False),                  # unknown stage: DeepSpeed itself decides
    (None, False, "DDP / one process", False),
])
def test_resume_under_another_engine_is_refused_in_one_line(tmp_path, written, deepspeed_dir, launch, refused):
    from resampling_forcing.checkpoint import DEEPSPEED_STATE, check_resume_world
    from resampling_forcing.models.loading import CheckpointError

    ckpt = tmp_path / "step_0000004"
    (ckpt / DEEPSPEED_STATE).mkdir(parents=True) if deepspeed_dir else ckpt.mkdir()
    state = {"step": 4, "world_size": 2} | ({} if written is None else {"engine": written})
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    if not refused:
        check_resume_world(ckpt, 2, launch)
        return
    with pytest.raises(CheckpointError) as e:
        check_resume_world(ckpt, 2, launch)
    msg = str(e.value)
    assert "\n" not in msg and f"this launch uses {launch}" in msg and f"train.init_from={ckpt}" in msg


def test_nan_loss_skips_then_aborts(tmp_path, synth, monkeypatch):
    run = tmp_path / "run"
    original = Trainer.compute_loss
    bad_positions = {2}

    def flaky(self, batch, stage, gen):
        loss, per_chunk, t_s, dt = original(self, batch, stage, gen)
        if self.data_position - 1 in bad_positions or self.data_position - 1 >= 100:
            loss = loss * float("nan")
        return loss, per_chunk, t_s, dt

    monkeypatch.setattr(Trainer, "compute_loss", flaky)
    train(cfg_for(run, synth, "train.save_every=2", steps_tf=2, steps_rf=2))
    log = read_log(run)
    assert [r["skipped"] for r in log] == [0, 0, 1, 0]  # position 2 skipped; step 3 used position 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert all(torch.isfinite(p).all() for p in load_model(run / "checkpoints" / "step_0000004").parameters())
    # from position 5 on every loss is NaN: abort after max_bad_steps in a row, checkpoint intact
    bad_positions.update(range(5, 1000))
    with pytest.raises(TrainingAborted, match="3 non-finite losses in a row.*step_0000004"):
        train(cfg_for(run, synth, "train.save_every=2", "train.max_bad_steps=3", steps_tf=2, steps_rf=6))
    assert [s for s, _ in list_checkpoints(run)][-1] == 4
    load_model(run / "checkpoints" / "step_0000004")


def test_non_finite_counter_survives_a_resume(tmp_path, synth, monkeypatch):
    """The count of non-finite losses in a row is part of the checkpoint: a run resumed with 2 already
    counted aborts at the first further one when max_bad_steps=3 (it restarted from 0 before)."""
    run = tmp_path / "run"
    train(cfg_for(run, synth, "train.save_every=2", steps_tf=2, steps_rf=0))
    ckpt = run / "checkpoints" / "step_0000002"
    state = json.loads((ckpt / STATE_FILE).read_text())
    assert state["bad_in_a_row"] == 0
    state["bad_in_a_row"] = 2
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    original = Trainer.compute_loss
    calls = []

    def nan_loss(self, batch, stage, gen):
        loss, per_chunk, t_s, dt = original(self, batch, stage, gen)
        calls.append(self.step)
        return loss * float("nan"), per_chunk, t_s, dt

    monkeypatch.setattr(Trainer, "compute_loss", nan_loss)
    with pytest.raises(TrainingAborted, match="3 non-finite losses in a row at step 2"):
        train(cfg_for(run, synth, "train.save_every=2", "train.max_bad_steps=3", steps_tf=2, steps_rf=4))
    assert calls == [2]  # one more non-finite loss, not three


def _poison(ckpt, scale=None):
    """Rewrite a checkpoint's model.safetensors with a NaN in one tensor (or every float tensor * scale)."""
    from safetensors.torch import load_file, save_file

    f = ckpt / "model.safetensors"
    state = load_file(str(f))
    if scale is None:
        key = sorted(state)[0]
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")
    else:
        state = {k: v * scale if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(f))


def test_nan_abort_names_a_verified_good_checkpoint(tmp_path, synth):
    """After the abort, the checkpoint named "last good" has finite weights and a finite loss: a newer
    one with NaN weights is passed over (and named), and when none is good the message says none."""
    run = tmp_path / "run"
    train(cfg_for(run, synth, "train.save_every=2", "train.keep_last=0", steps_tf=2, steps_rf=2))
    ckpts = dict(list_checkpoints(run))
    assert sorted(ckpts) == [2, 4]
    _poison(ckpts[4])  # resuming from it makes every loss NaN
    with pytest.raises(TrainingAborted) as info:
        train(cfg_for(run, synth, "train.save_every=2", "train.keep_last=0", "train.max_bad_steps=2",
                      steps_tf=2, steps_rf=6))
    msg = str(info.value)
    assert f"Last good checkpoint: {ckpts[2]} (" in msg, msg
    assert "step_0000004 rejected: model.safetensors has non-finite values" in msg, msg
    # step 2: finite but enormous weights -> a non-finite loss; no checkpoint is good
    _poison(ckpts[2], scale=1e30)
    assert all(torch.isfinite(p).all() for p in load_model(ckpts[2]).parameters())
    with pytest.raises(TrainingAborted) as info:
        train(cfg_for(run, synth, "train.save_every=2", "train.keep_last=0", "train.max_bad_steps=2",
                      steps_tf=2, steps_rf=6))
    msg = str(info.value)
    assert "Last good checkpoint: none (" in msg, msg
    assert "step_0000002 rejected: its weights give a non-finite loss" in msg, msg


def test_failed_save_leaves_no_partial_checkpoint(tmp_path, synth, monkeypatch):
    run = tmp_path / "run"
    original = Trainer._export
    calls = {"n": 0}

    def export_fails_second_time(self, folder):
        calls["n"] += 1
        if calls["n"] == 2:
            original(self, folder)
            (folder / "model.safetensors").write_bytes(b"half")  # a torn write...
            raise OSError("disk full")  # ...then a crash before the rename
        original(self, folder)

    monkeypatch.setattr(Trainer, "_export", export_fails_second_time)
    with pytest.raises(OSError, match="disk full"):
        train(cfg_for(run, synth, "train.save_every=2", steps_tf=2, steps_rf=2))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_0000002"]  # the final name only ever holds a complete one; the torn temp is removed
    monkeypatch.setattr(Trainer, "_export", original)
    result = train(cfg_for(run, synth, "train.save_every=2", steps_tf=2, steps_rf=2))  # auto-resume from step 2
    assert result["step"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    load_model(run / "checkpoints" / "step_0000004")


@pytest.mark.parametrize("extra", [
    ["train.stages=[{name: na, objective: noise_augmentation, steps: 1, noise_aug_scale: 0.2}]"],
    ["train.stages=[{name: pr, objective: parallel_resampling, steps: 1, resample_steps: 2}]"],
    ["train.stages=[{name: rr, objective: resampling, steps: 1, routing: true, resample_cfg: 2.0}]",
     "attention.routing.mode=topk", "attention.routing.top_k=1", "train.grad_accum=2"],
])
def test_objectives_and_routing_stage_train(tmp_path, synth, extra):
    run = tmp_path / "run"
    result = train(cfg_for(run, synth, *extra))
    assert result["step"] == 1
    rec = read_log(run)[0]
    assert torch.isfinite(torch.tensor(rec["loss"])) and rec["grad_norm"] > 0


def test_text_dropout_uses_the_empty_prompt(tmp_path, synth):
    trainer = Trainer(cfg_for(tmp_path / "run", synth, "data.text_dropout=1.0"))
    seen = []
    inner_forward = trainer.inner.forward_dual
    trainer.inner.forward_dual = lambda h, n, t, ctx, attn, ht=None: seen.append(ctx) or inner_forward(h, n, t, ctx, attn, ht)
    batch = trainer.data.batch(0)
    trainer.compute_loss(batch, trainer.cfg.train.stages[0], torch.Generator().manual_seed(0))
    empty = trainer.data.text_encoder.encode([""])[0]
    assert torch.equal(seen[0], empty.expand_as(seen[0])) and not torch.equal(batch["text"], seen[0])
    trainer.acc.end_training()


def test_objectives_share_the_losss_random_numbers(tmp_path, synth):
    """Common random numbers across an ablation's arms: at the same data position, teacher forcing and
    resampling train on the same timesteps and noise (the degradation drew first, so they differed)."""
    trainer = Trainer(cfg_for(tmp_path / "run", synth, "data.text_dropout=0.5"))
    seen = []
    inner_forward = trainer.inner.forward_dual
    trainer.inner.forward_dual = lambda h, n, t, ctx, attn, ht=None: seen.append((h, n, t, ctx)) or inner_forward(
        h, n, t, ctx, attn, ht)
    batch = trainer.data.batch(0)
    for stage in trainer.cfg.train.stages:  # teacher forcing, resampling
        trainer.compute_loss(batch, stage, torch.Generator().manual_seed(7))
    (h_tf, n_tf, t_tf, c_tf), (h_rf, n_rf, t_rf, c_rf) = seen
    assert torch.equal(n_tf, n_rf) and torch.equal(t_tf, t_rf) and torch.equal(c_tf, c_rf)
    assert not torch.equal(h_tf, h_rf)  # only the history differs
    trainer.acc.end_training()


def test_deepspeed_export_takes_the_fp32_master(monkeypatch):
    """Under DeepSpeed the exported weights are its fp32 master copy, not the module's bf16 working copy
    (every init_from chain restarted from rounded weights), gathered parameter by parameter to the CPU on
    the main process only."""
    from types import SimpleNamespace

    import deepspeed.utils

    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    params = dict(model.named_parameters())
    master = {n: p.detach().float() + 1e-3 for n, p in params.items()}  # finer than bf16 can hold
    monkeypatch.setattr(deepspeed.utils, "safe_get_full_fp32_param",
                        lambda p: next(master[n] for n, q in params.items() if q is p))
    fake = SimpleNamespace(is_deepspeed=True, zero_stage=2, inner=model, acc=SimpleNamespace(is_main_process=True))
    state = Trainer._export_state(fake)
    assert set(state) == set(master) and all(torch.equal(state[n], master[n]) for n in master)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())
    fake.acc.is_main_process = False
    assert Trainer._export_state(fake) is None  # the other processes take part in the gathers, keep nothing
    fake.is_deepspeed = False
    assert Trainer._export_state(fake) is None  # DDP / one process: the module's own state


@pytest.mark.parametrize("context_t", [0.0, 0.3])
def test_history_stream_is_what_the_cache_holds_at_context_t(tmp_path, synth, context_t):
    """diffusion.context_t > 0: the sampler and the resampling rollout write each finished chunk re-noised
    to context_t; the training forward's history stream must be the same (it stayed clean at t = 0, so a
    model trained with context_t > 0 learned on histories it never sees)."""
    trainer = Trainer(cfg_for(tmp_path / "run", synth, f"diffusion.context_t={context_t}"))
    seen = []
    inner_forward = trainer.inner.forward_dual
    trainer.inner.forward_dual = lambda h, n, t, ctx, attn, ht=None: seen.append((h, ht)) or inner_forward(
        h, n, t, ctx, attn, ht)
    batch = trainer.data.batch(0)
    trainer.compute_loss(batch, trainer.cfg.train.stages[0], torch.Generator().manual_seed(0))  # teacher forcing
    history, history_t = seen[0]
    x = batch["latents"]
    if context_t == 0:
        assert history_t is None and torch.equal(history, x)
    else:
        assert torch.equal(history_t, torch.full((x.shape[0], trainer.num_chunks), context_t))
        noise = (history - (1 - context_t) * x) / context_t  # x_t = (1 - t) x + t eps
        assert 0.9 < float(noise.std()) < 1.1 and abs(float(noise.mean())) < 0.1
    trainer.acc.end_training()


def _cli():
    spec = importlib.util.spec_from_file_location("train_cli", REPO / "train" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.mark.parametrize("bad", [
    ["train.nosuchkey=1"],
    ["data.source=manifest", "data.manifest=/nonexistent/manifest.jsonl"],
    ["data.source=latents", "data.latents_dir=/nonexistent"],
    ["train.stages=[{name: r, steps: 1, routing: true}]"],
    ["data.num_frames=7"],  # 7 latent frames are not whole chunks of 2
])
def test_cli_bad_config_or_data_exits_2(tmp_path, synth, capsys, bad):
    code = _cli()(["--config", str(TINY_YAML)] + small_overrides(tmp_path / "run", synth) + bad)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) >= 1 and err[-1].startswith("error: ")


def test_cli_exit_code_of_a_stopped_run_is_not_success(tmp_path, synth, capsys, monkeypatch):
    """SIGTERM mid-run: the checkpoint is saved and train.py exits 143 (it exited 0, so a job chain
    waiting for success started the next stage on an unfinished run); the resumed run exits 0."""
    original = sigterm_after_step(monkeypatch, 2)
    argv = ["--config", str(TINY_YAML)] + small_overrides(tmp_path / "run", synth)
    assert _cli()(argv) == 128 + signal.SIGTERM
    assert "interrupted at step 2" in capsys.readouterr().out
    monkeypatch.setattr(Trainer, "train_step", original)
    assert _cli()(argv) == 0


def test_cli_exit_code_on_a_rank_stopped_by_another_ranks_signal(tmp_path, synth, monkeypatch):
    """A rank that stops because ANOTHER rank got the signal has no signal of its own (result["signal"] is
    None): it exits 143 too (it raised KeyError before)."""
    import resampling_forcing.training as T

    monkeypatch.setattr(T, "train", lambda cfg: {"status": "interrupted", "step": 3, "checkpoint": "c", "signal": None})
    assert _cli()(["--config", str(TINY_YAML)] + small_overrides(tmp_path / "run", synth)) == 128 + signal.SIGTERM


def test_latents_source_trains(tmp_path, synth):
    """data.source=latents: a store from data.latents.precompute; the empty-prompt embedding is
    computed once and kept next to it."""
    from resampling_forcing.data.latents import precompute
    from resampling_forcing.data.loader import synthetic_manifest
    from resampling_forcing.data.video import VideoClipDataset
    from resampling_forcing.encoders import build_text_encoder, build_vae

    cfg = cfg_for(tmp_path / "run", synth)
    ds = VideoClipDataset(synthetic_manifest(cfg), 8, 16, 16, fps=cfg.data.fps, split="train", random_start=False)
    store = tmp_path / "latents"
    precompute(ds, build_vae(cfg.encoders), build_text_encoder(cfg.encoders), store, shard_size=8, progress=False,
               encoders=dataclasses.asdict(cfg.encoders))
    result = train(cfg_for(tmp_path / "run", synth, "data.source=latents", f"data.latents_dir={store}"))
    assert result["step"] == 6 and (store / "null_text.safetensors").is_file()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_log(tmp_path / "run"))
    # a store without it (made before precompute wrote it), or with a stale one of another text length: the
    # trainer computes it with the configured encoder, also with text dropout off (it used zeros then,
    # the unconditional context of resampling CFG and of the gap monitor)
    from safetensors.torch import load_file, save_file

    from resampling_forcing.data.loader import TrainData, prepare_null_text

    want = build_text_encoder(cfg.encoders).encode([""])[0].float()
    for stale in (None, torch.zeros(2, 3)):
        (store / "null_text.safetensors").unlink()
        if stale is not None:
            save_file({"text": stale}, str(store / "null_text.safetensors"))
        c = cfg_for(tmp_path / "run2", synth, "data.source=latents", f"data.latents_dir={store}", "data.text_dropout=0")
        prepare_null_text(c, torch.device("cpu"))
        assert torch.equal(load_file(str(store / "null_text.safetensors"))["text"], want)
        assert torch.equal(TrainData(c, 2, 0, 1, torch.device("cpu"), None, None).null_text, want)

    # a store that does not fit the config is refused, naming the key (it trained silently before)
    from resampling_forcing.data.loader import DataError

    def refuse(*extra, match):
        with pytest.raises(DataError, match=match):
            train(cfg_for(tmp_path / "other", synth, "data.source=latents", f"data.latents_dir={store}", *extra))

    refuse("data.fps=5.0", match=r"holds clips with data\.fps=.*the config has 5\.0; .*set data\.fps=")
    refuse("encoders.text_ngram=1", match=r"encoded with encoders\.text_ngram=2, the config has 1")
    refuse("data.num_frames=12", "data.height=24", match=r"holds clips with data\.num_frames=8, the config has 12")
    index = json.loads((store / "index.json").read_text())
    index["latent_shape"][0] += 1
    (store / "index.json").write_text(json.dumps(index))
    refuse(match=r"holds latents \[C, f, h, w\] = \[49, 8, 4, 4\], this config's encoders make \[48, 8, 4, 4\]")
    index["latent_shape"][0] -= 1
    index["complete"] = False  # a precompute stopped (or still running): trained on the part before
    (store / "index.json").write_text(json.dumps(index))
    refuse(match=r"the latent store is unfinished \(21 clips so far.*rerunning train/precompute\.py with --out ")
    index["complete"] = True
    (store / "index.json").write_text(json.dumps(index))
    shard = store / index["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated: failed in a loader worker before
    refuse(match=r"shard-00000\.safetensors: damaged shard .*delete it and rerun train/precompute\.py")


def test_ema_lives_where_the_prepared_weights_do(tmp_path, synth, monkeypatch):
    """accelerate's prepare moves the model to the GPU; an EMA built before it stayed on the CPU and the
    first update mixed devices. Here prepare moves it to the meta device, which CPU tests can see."""
    import accelerate

    from resampling_forcing.training import Trainer

    prepare = accelerate.Accelerator.prepare

    def prepare_then_move(self, *args):
        out = prepare(self, *args)
        out[0].to("meta")
        return out

    monkeypatch.setattr(accelerate.Accelerator, "prepare", prepare_then_move)
    trainer = Trainer(cfg_for(tmp_path / "run", synth, "train.ema_decay=0.9"))
    assert {v.device.type for v in trainer.ema.state_dict().values()} == {"meta"}


def test_loader_order_is_a_function_of_the_position(tmp_path, synth):
    """Batches depend only on (seed, position, rank, world): the same with and without DataLoader
    workers, across an epoch boundary, and disjoint between ranks."""
    from resampling_forcing.data.loader import TrainData, synthetic_manifest
    from resampling_forcing.encoders import build_text_encoder, build_vae

    cfg = cfg_for(tmp_path / "run", synth, "data.source=manifest", "data.text_dropout=0.0")
    cfg.data.manifest = str(synthetic_manifest(cfg))
    enc = dict(vae=build_vae(cfg.encoders), text_encoder=build_text_encoder(cfg.encoders))
    plain = TrainData(cfg, 2, **enc)
    cfg.data.num_workers = 2
    workers = TrainData(cfg, 2, **enc)
    for pos in range(plain.per_epoch + 2):  # one loader per epoch
        a, b = plain.batch(pos), workers.batch(pos)
        assert torch.equal(a["latents"], b["latents"]) and a["caption"] == b["caption"]
    r0 = TrainData(cfg, 2, rank=0, world=2, **enc).indices(5)
    r1 = TrainData(cfg, 2, rank=1, world=2, **enc).indices(5)
    assert len(set(r0) | set(r1)) == 4
    from resampling_forcing.seeds import mix_seed

    for pos in (plain.per_epoch + 1, 0, plain.per_epoch + 1):  # each epoch's permutation drawn once, read in any order
        e, i = divmod(pos, plain.per_epoch)
        perm = torch.randperm(plain.num_items, generator=torch.Generator().manual_seed(mix_seed(cfg.train.seed, e)))
        assert plain.indices(pos) == [plain.rows[j] for j in perm[2 * i:2 * i + 2].tolist()]
    # a training-seed replicate gets its own epoch orders, not another seed's shifted by an epoch
    # (the permutation was seeded with seed + epoch: seed 1's epoch 0 was seed 0's epoch 1)
    cfg.train.seed = 1
    seed1 = TrainData(cfg, 2, **enc)
    epoch = range(plain.per_epoch)
    assert [seed1.indices(p) for p in epoch] != [plain.indices(p + plain.per_epoch) for p in epoch]


def test_progress_bar_shows_the_current_steps_loss(tmp_path, synth, monkeypatch):
    """When the bar is drawn for step s (update), its postfix already holds step s's loss."""
    import tqdm.auto

    drawn = []

    class Recorder:
        def __init__(self, *a, **k):
            self.postfix = None

        def set_postfix(self, refresh=True, **kw):
            self.postfix = kw

        def update(self, n=1):
            drawn.append(self.postfix and self.postfix["loss"])

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    run = tmp_path / "run"
    train(cfg_for(run, synth, "train.progress=true", "train.log_every=1", steps_tf=2, steps_rf=1))
    assert drawn == [f"{r['loss']:.4f}" for r in read_log(run)]


def test_warnings_print_above_the_progress_bar(tmp_path, synth, monkeypatch, capsys):
    """A warning during training starts its own console line (it was glued onto the bar's line)."""
    import logging
    import sys

    original = Trainer.compute_loss

    def flaky(self, batch, stage, gen):
        loss, per_chunk, t_s, dt = original(self, batch, stage, gen)
        return (loss * float("nan") if self.data_position - 1 == 1 else loss), per_chunk, t_s, dt

    monkeypatch.setattr(Trainer, "compute_loss", flaky)
    handler = logging.StreamHandler(sys.stderr)  # the console handler train/train.py's basicConfig adds
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        train(cfg_for(tmp_path / "run", synth, "train.progress=true", steps_tf=2, steps_rf=1))
    finally:
        logging.getLogger().removeHandler(handler)
    err = capsys.readouterr().err
    lines = [ln.split("\r")[-1] for ln in err.split("\n") if "non-finite loss" in ln]
    assert lines and all(ln.startswith("WARNING step 1: non-finite loss") for ln in lines), err
    assert "train: 100%" in err


def test_param_count_of_a_zero3_partitioned_model():
    """ZeRO-3 leaves empty parameters with the full size in ds_numel: the log said "0.0M params"."""
    from resampling_forcing.training_utils import param_count

    layer = torch.nn.Linear(10, 20)
    assert param_count(layer) == 220
    for prm in layer.parameters():
        prm.ds_numel = prm.numel()
        prm.data = torch.empty(0)
    assert sum(prm.numel() for prm in layer.parameters()) == 0 and param_count(layer) == 220
    from resampling_forcing.training_utils import format_count

    assert [format_count(n) for n in (220, 52_100, 1_300_000, 1_420_000_000)] == ["220", "52.1K", "1.3M", "1.42B"]


def test_training_skips_micro_batches_of_bad_videos_only(tmp_path, synth, caplog):
    """Batch size 1 on a manifest with corrupt files between the good ones: a position whose only video
    is bad is skipped (no stand-in video), training completes, the end-of-run summary counts each once."""
    import json
    import logging
    import os

    from resampling_forcing.data.loader import synthetic_manifest

    cfg = cfg_for(tmp_path / "run", synth)
    rows = [json.loads(line) for line in synthetic_manifest(cfg).read_text().splitlines()]
    rows = [r for r in rows if r.get("split", "train") == "train"][:6]
    out = []
    for k, r in enumerate(rows):
        r["path"] = str(synthetic_manifest(cfg).parent / r["path"])
        out.append(r)
        junk = tmp_path / f"junk{k}.mp4"
        junk.write_bytes(os.urandom(2000))
        out.append({"path": str(junk), "caption": f"junk {k}"})
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in out))
    with caplog.at_level(logging.WARNING):
        result = train(cfg_for(tmp_path / "run", synth, "data.source=manifest", f"data.manifest={man}",
                               "train.batch_size=1", steps_tf=3, steps_rf=3))
    assert result["status"] == "completed" and result["step"] == 6
    log = read_log(tmp_path / "run")
    assert len(log) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert log[-1]["data_position"] > 6  # positions of bad videos were skipped, not filled in
    skips = [r.getMessage() for r in caplog.records if "skipping video" in r.getMessage()]
    assert skips and len(skips) == len(set(skips)), skips  # one warning per bad file
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: ")]
    assert summary and f"12 videos listed, {len(skips)} skipped" in summary[-1], summary


# ----------------------------------------------------------------------------- ramp from teacher forcing


def test_ramp_level_schedule():
    """r = min(1, (steps into the stage + 1) / ramp_steps); None (hard switch) for ramp none, ramp_steps 0
    and teacher-forcing stages."""
    cfg = Config()
    cfg.train.stages = [StageConfig(name="tf", steps=3),
                        StageConfig(name="rf", objective="resampling", steps=5, ramp="probability", ramp_steps=4),
                        StageConfig(name="rf2", objective="resampling", steps=2, ramp="strength", ramp_steps=0),
                        StageConfig(name="rf3", objective="resampling", steps=2, ramp="none", ramp_steps=9)]
    assert [ramp_at(cfg, s) for s in range(12)] == [None] * 3 + [0.25, 0.5, 0.75, 1.0, 1.0] + [None] * 4


@pytest.mark.parametrize("override,key", [
    ("train.stages.1.ramp_steps=-1", r"train\.stages\[1\]\.ramp_steps=-1: must be >= 0"),
    ("train.stages.0.ramp=strength", r"train\.stages\[0\]\.ramp=strength: a teacher_forcing stage"),
    ("train.stages.1.ramp=linear", r"train\.stages\[1\]\.ramp: 'linear' is not one of"),
    # settings the stage would ignore (ramp: none with ramp_steps stays the hard switch: a toggle)
    ("train.stages.0.resample_steps=4", r"train\.stages\[0\]\.resample_steps=4: only a resampling stage .*teacher_forcing"),
    ("train.stages.1.objective=noise_augmentation train.stages.1.resample_cfg=2",
     r"train\.stages\[1\]\.resample_cfg=2\.0: only a resampling stage .*noise_augmentation\); remove it"),
    ("train.stages.1.ramp=probability train.stages.1.ramp_steps=9",
     r"train\.stages\[1\]\.ramp_steps=9 is longer than the stage \(steps=3\): the ramp would stop at r=0\.33"),
])
def test_ramp_config_errors_name_the_key(tmp_path, synth, override, key):
    from resampling_forcing.config_checks import validate

    with pytest.raises(ConfigError, match=key) as err:  # the training rules too (what Trainer checks)
        validate(cfg_for(tmp_path / "run", synth, *override.split()), training=True)
    assert "\n" not in str(err.value)


def test_resume_in_the_middle_of_a_ramp_is_exact(tmp_path, synth, monkeypatch):
    """A probability ramp over 4 steps, interrupted after its second step: the resumed run logs the same
    losses, t_s and ramp levels as the uninterrupted one; the hard-switch stage logs no ramp."""
    ramp = ["train.stages.1.ramp=probability", "train.stages.1.ramp_steps=4", "train.save_every=100"]
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    train(cfg_for(ref_run, synth, *ramp, steps_tf=1, steps_rf=5))
    ref = read_log(ref_run)
    assert [r.get("ramp") for r in ref] == [None, 0.25, 0.5, 0.75, 1.0, 1.0]
    original = sigterm_after_step(monkeypatch, 3)
    assert train(cfg_for(run, synth, *ramp, steps_tf=1, steps_rf=5))["step"] == 3
    monkeypatch.setattr(Trainer, "train_step", original)
    assert train(cfg_for(run, synth, *ramp, steps_tf=1, steps_rf=5))["step"] == 6
    got = read_log(run)
    for k in ("loss", "loss_chunk", "ramp", "t_s_mean", "t_s_min"):
        assert [r.get(k) for r in got] == [r.get(k) for r in ref], k
    # the ramp kept some early histories on the ground truth (t_s 0) and changed the run
    assert ref[1]["t_s_min"] == 0.0
    plain = tmp_path / "plain"
    train(cfg_for(plain, synth, "train.save_every=100", steps_tf=1, steps_rf=5))
    assert not any("ramp" in r for r in read_log(plain))
    off = tmp_path / "off"  # ramp none with ramp_steps set: the hard switch, bit for bit
    train(cfg_for(off, synth, "train.save_every=100", "train.stages.1.ramp=none", "train.stages.1.ramp_steps=4",
                  steps_tf=1, steps_rf=5))
    assert [r["loss_chunk"] for r in read_log(off)] == [r["loss_chunk"] for r in read_log(plain)]
    assert [r["loss"] for r in read_log(plain)][1:] != [r["loss"] for r in ref][1:]


def test_an_accelerator_accumulating_otherwise_is_refused(tmp_path, synth, monkeypatch):
    """accelerate divides each micro-batch's loss by its own gradient_accumulation_steps: an Accelerator
    passed to train(), or `accelerate launch --gradient_accumulation_steps`, that disagrees with
    train.grad_accum summed the micro-batches instead of averaging them (twice the gradient norm)."""
    from accelerate import Accelerator

    with pytest.raises(ConfigError, match=r"the Accelerator accumulates 1 micro-batches per step, train\.grad_accum is 2"):
        train(cfg_for(tmp_path / "a", synth, "train.grad_accum=2"), Accelerator(cpu=True))
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "3")  # what the launcher's flag sets
    with pytest.raises(ConfigError, match=r"accumulates 3 micro-batches per step, train\.grad_accum is 2"):
        train(cfg_for(tmp_path / "b", synth, "train.grad_accum=2"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing left behind
