"""sample/sample.py and resampling_forcing.pipeline on a tiny random checkpoint saved in the
run-directory layout of docs/CONTRACTS.md (pixel_shuffle VAE + hash text encoder)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from resampling_forcing import sampler
from resampling_forcing.config import to_dict
from resampling_forcing.encoders import PixelShuffleVAE, VideoCodec
from resampling_forcing.mp4 import read_mp4, write_mp4
from resampling_forcing.models.wan import CausalWanModel
from resampling_forcing.pipeline import Pipeline, PipelineError, prepare_init_video, resolve_checkpoint
from resampling_forcing.options import SamplingOptions
from resampling_forcing.sampler import sample

from helpers import load_sample_cli, save_checkpoint_for_tests, tiny_run_config as tiny_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "sample" / "sample.py"
CF = 2  # latent frames per chunk (see helpers.tiny_run_config)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = save_checkpoint_for_tests(tmp_path_factory.mktemp("run"), step=10)
    save_checkpoint_for_tests(root, step=20, seed=1)
    (root / "checkpoints" / ".tmp_step_0000030").mkdir()  # an unfinished save: ignored
    return root


CLI = load_sample_cli()


def cli(*args):
    return CLI.main([str(a) for a in args])


def _mp4s(folder):
    return sorted(p.name for p in Path(folder).rglob("*.mp4"))


# ----------------------------------------------------------------------------- loading


def test_resolve_latest_checkpoint_and_ema(run_dir, tmp_path):
    info = resolve_checkpoint(run_dir)
    assert info.kind == "run" and info.step == 20 and info.weights.name == "model.safetensors"
    ck = info.model_dir
    assert resolve_checkpoint(ck).kind == "checkpoint"
    e = save_checkpoint_for_tests(tmp_path / "e", ema=True)
    assert resolve_checkpoint(e).weights.name == "ema.safetensors"
    assert resolve_checkpoint(e, use_ema=False).weights.name == "model.safetensors"
    pe = Pipeline.from_pretrained(e)
    pm = Pipeline.from_pretrained(e, use_ema=False)
    assert pe.source["ema"] and not pm.source["ema"]
    w = pe.model.blocks[0].self_attn.q.weight
    torch.testing.assert_close(w, pm.model.blocks[0].self_attn.q.weight + 0.1)


def test_pipeline_generate_matches_sampler(run_dir):
    pipe = Pipeline.from_pretrained(run_dir)
    assert pipe.latent_hw == (4, 4) and pipe.chunk_frames == CF
    frames = []
    res = pipe.generate(["a red circle", "a blue square"], 3, seed=5, callback=lambda c: frames.append(c.frames))
    assert res.video.shape == (2, 3 * CF, 8, 8, 3) and res.video.dtype == torch.uint8
    assert len(frames) == 3 and frames[0].shape == (2, 3, CF, 8, 8)
    ctx = pipe.text_encoder.encode(["a red circle", "a blue square"])
    neg = pipe.text_encoder.encode([""])
    opts = SamplingOptions(steps=2, shift=3.0, cfg_scale=2.0)
    ref = sample(pipe.model, ctx, 3, (4, 4), neg_context=neg, options=opts, seed=5)
    torch.testing.assert_close(res.latents, ref.latents)
    # per-sample seeds: the second prompt alone with its index gives the same video
    alone = pipe.generate(["a blue square"], 3, seed=5, indices=[1])
    torch.testing.assert_close(alone.latents[0], res.latents[1], rtol=1e-5, atol=1e-5)


def test_sampling_options_routing_flags(run_dir):
    pipe = Pipeline.from_pretrained(run_dir)
    assert pipe.sampling_options().routing is None
    o = pipe.sampling_options(top_k=2, sink=1)
    assert (o.routing.mode, o.routing.top_k, o.routing.sink_chunks) == ("topk", 2, 1)
    o = pipe.sampling_options(window=1)
    assert (o.routing.mode, o.routing.window_chunks) == ("window", 1)
    assert pipe.sampling_options(routing="dense").routing is None
    with pytest.raises(PipelineError, match="routing='dense' contradicts window=1"):  # was: window silently dropped
        pipe.sampling_options(routing="dense", window=1)
    with pytest.raises(PipelineError):
        pipe.sampling_options(top_k=0)
    # options built once and passed down == the same settings as generate() arguments
    o = pipe.sampling_options(steps=2, top_k=1, sink=1)
    a = pipe.generate("x", 3, options=o, seed=1)
    b = pipe.generate("x", 3, steps=2, top_k=1, sink=1, seed=1)
    assert torch.equal(a.latents, b.latents) and a.options == b.options
    with pytest.raises(PipelineError, match="not both"):
        pipe.generate("x", 1, options=o, steps=2)


def test_raw_wan_checkpoint_with_config(tmp_path):
    """An original-layout Wan checkpoint (config.json + diffusion_pytorch_model.safetensors) plus
    a YAML for everything the checkpoint does not say."""
    from safetensors.torch import save_file

    cfg = tiny_config()
    torch.manual_seed(0)
    model = CausalWanModel(cfg.model)
    wan = tmp_path / "wan"
    wan.mkdir()
    m = cfg.model
    (wan / "config.json").write_text(json.dumps(dict(
        model_type="t2v", dim=m.dim, num_heads=m.num_heads, ffn_dim=m.ffn_dim, num_layers=m.num_layers,
        in_dim=m.in_channels, out_dim=m.out_channels, text_dim=m.text_dim, freq_dim=m.freq_dim,
        patch_size=m.patch_size, eps=m.eps)))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(wan / "diffusion_pytorch_model.safetensors"))
    yml = tmp_path / "wan.yaml"
    d = to_dict(cfg)
    d["model"] = dict(chunk_frames=CF)
    yml.write_text(yaml.safe_dump(d))
    pipe = Pipeline.from_pretrained(wan, config=yml)
    assert pipe.source["kind"] == "wan" and pipe.model.cfg.dim == 32 and pipe.chunk_frames == CF
    out = tmp_path / "wan.mp4"
    assert cli("--checkpoint", wan, "--config", yml, "--prompt", "x", "--num-chunks", 1, "--output", out,
               "--quiet", "--device", "cpu") == 0
    assert read_mp4(out).shape == (CF, 8, 8, 3)
    # a raw Wan checkpoint fixes the sizes only: chunk_frames is the config's to set (our own
    # checkpoints fix every model key, and such a --set is refused there: test_bad_inputs_exit_2_one_line)
    out1 = tmp_path / "wan1.mp4"
    assert cli("--checkpoint", wan, "--config", yml, "--set", "model.chunk_frames=1", "--prompt", "x", "--num-chunks",
               1, "--output", out1, "--quiet", "--device", "cpu") == 0
    assert read_mp4(out1).shape == (1, 8, 8, 3)
    assert cli("--checkpoint", wan, "--config", yml, "--set", "model.dim=64", "--prompt", "x", "--num-chunks", 1,
               "--output", tmp_path / "wan2.mp4", "--quiet", "--device", "cpu") == 2


# ----------------------------------------------------------------------------- the CLI


def test_cli_writes_mp4_and_json(run_dir, tmp_path):
    out = tmp_path / "v" / "red.mp4"
    rc = cli("--checkpoint", run_dir, "--prompt", "a red circle moves left", "--num-chunks", 3, "--output", out,
             "--seed", 3, "--steps", 2, "--cfg", 1.5, "--device", "cpu", "--quiet")
    assert rc == 0
    frames, fps = read_mp4(out, with_fps=True)
    assert frames.shape == (3 * CF, 8, 8, 3) and fps == pytest.approx(4.0)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["prompt"] == "a red circle moves left" and meta["seed"] == 3 and meta["sample_index"] == 0
    assert meta["sampling"]["steps"] == 2 and meta["sampling"]["cfg_scale"] == 1.5
    assert meta["sampling"]["routing"]["mode"] == "dense"
    t = meta["timings"]
    for key in ("first_chunk_latency_s", "first_chunk_latency_no_decode_s", "per_chunk_s", "per_chunk_denoise_s",
                "per_chunk_decode_s", "fps_with_decode", "fps_without_decode", "peak_memory_mib", "load_s"):
        assert key in t, key
    assert len(t["per_chunk_s"]) == 3
    assert meta["pipeline"]["source"]["step"] == 20
    assert _mp4s(tmp_path) == ["red.mp4"]


def test_cli_prompts_file_batches_are_composition_independent(run_dir, tmp_path):
    pf = tmp_path / "prompts.txt"
    pf.write_text("# comment\na red circle\n\na blue square\na green circle\n")
    cli("--checkpoint", run_dir, "--prompts-file", pf, "--num-chunks", 2, "--output", f"{tmp_path / 'b1'}/",
        "--batch", 1, "--quiet", "--device", "cpu")
    cli("--checkpoint", run_dir, "--prompts-file", pf, "--num-chunks", 2, "--output", tmp_path / "b3" / "v.mp4",
        "--batch", 3, "--quiet", "--device", "cpu")
    names1 = _mp4s(tmp_path / "b1")
    assert names1 == ["000_a_red_circle.mp4", "001_a_blue_square.mp4", "002_a_green_circle.mp4"]
    names3 = _mp4s(tmp_path / "b3")
    assert names3 == ["v_000_a_red_circle.mp4", "v_001_a_blue_square.mp4", "v_002_a_green_circle.mp4"]
    for a, b in zip(names1, names3):
        x, y = read_mp4(tmp_path / "b1" / a), read_mp4(tmp_path / "b3" / b)
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
        ja = json.loads((tmp_path / "b1" / a).with_suffix(".json").read_text())
        jb = json.loads((tmp_path / "b3" / b).with_suffix(".json").read_text())
        assert ja["prompt"] == jb["prompt"] and ja["sample_index"] == jb["sample_index"]
    assert not np.array_equal(read_mp4(tmp_path / "b1" / names1[0]), read_mp4(tmp_path / "b1" / names1[1]))


def test_cli_routing_and_selection(run_dir, tmp_path):
    out = tmp_path / "r.mp4"
    assert cli("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 4, "--output", out, "--top-k", 1,
               "--sink", 1, "--record-selection", "--quiet", "--device", "cpu") == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["sampling"]["routing"] == {"mode": "topk", "top_k": 1, "sink_chunks": 1, "window_chunks": 0}
    sel = np.load(tmp_path / meta["selection"])
    assert sel.shape == (4, 2, 2, 3)
    np.testing.assert_allclose(sel[3, :, :, 0], 1.0)  # sink
    # a batch: each video's file holds its own picks, as with --batch 1 (they were the batch's mean)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle bouncing\na blue square and a green circle bouncing\n")
    files = {}
    for batch in (1, 2):
        assert cli("--checkpoint", run_dir, "--prompts-file", prompts, "--batch", batch, "--num-chunks", 4,
                   "--output", tmp_path / f"b{batch}", "--top-k", 1, "--record-selection", "--quiet",
                   "--device", "cpu") == 0
        files[batch] = [np.load(f) for f in sorted((tmp_path / f"b{batch}").glob("*.selection.npy"))]
    assert len(files[2]) == 2 and not np.array_equal(files[2][0], files[2][1], equal_nan=True)
    for one, two in zip(files[1], files[2]):
        np.testing.assert_array_equal(one, two)
    out = tmp_path / "w.mp4"
    assert cli("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 2, "--output", out, "--window", 1,
               "--quiet", "--device", "cpu") == 0
    assert json.loads(out.with_suffix(".json").read_text())["sampling"]["routing"]["mode"] == "window"
    # --routing alone takes the numbers from the config (here --set; a top-k run's own config alike): it
    # was refused before the checkpoint was read
    for mode, key, value in (("topk", "top_k", 2), ("window", "window_chunks", 1)):
        out = tmp_path / f"{mode}.mp4"
        assert cli("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 2, "--output", out, "--routing", mode,
                   "--set", f"attention.routing.{key}={value}", "--quiet", "--device", "cpu") == 0
        got = json.loads(out.with_suffix(".json").read_text())["sampling"]["routing"]
        assert got["mode"] == mode and got[key] == value


def test_cli_bf16_smoke(run_dir, tmp_path):
    out = tmp_path / "h.mp4"
    assert cli("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 2, "--output", out, "--dtype", "bf16",
               "--top-k", 1, "--quiet", "--device", "cpu") == 0
    assert read_mp4(out).shape == (2 * CF, 8, 8, 3)
    assert json.loads(out.with_suffix(".json").read_text())["pipeline"]["dtype"] == "bfloat16"


def test_cli_init_video_continues(run_dir, tmp_path):
    """7 frames of 12x10 -> resized/cropped to 8x8, trimmed to 3 chunks (6 frames, the first one
    dropped); output = reconstruction of the history + the new chunks."""
    rng = np.random.default_rng(0)
    src = rng.integers(0, 255, (7, 12, 10, 3), dtype=np.uint8)
    vid = write_mp4(tmp_path / "in.mp4", src, fps=4)
    out = tmp_path / "cont.mp4"
    assert cli("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 2, "--output", out,
               "--init-video", vid, "--quiet", "--device", "cpu") == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["init_video"]["frames_in"] == 7 and meta["init_video"]["frames_used"] == 6
    assert meta["init_video"]["frames_dropped_from_start"] == 1
    assert meta["history_chunks"] == 3 and meta["history_frames"] == 6
    assert read_mp4(out).shape == (6 + 2 * CF, 8, 8, 3)
    # the history part of the output is the (lossless pixel-shuffle) reconstruction of the kept frames
    pipe = Pipeline.from_pretrained(run_dir)
    lat, info = pipe.load_init_video(vid)
    assert lat.shape == (1, 12, 6, 4, 4) and info["chunks"] == 3
    res = pipe.generate(["x"], 2, init_video=vid, seed=0)
    torch.testing.assert_close(res.latents[:, :, :6], lat)
    # continuing == a rollout whose cache holds those chunks
    ro_res = sample(pipe.model, pipe.encode_prompts(["x"]), 2, (4, 4), neg_context=pipe.encode_prompts([""]),
                    options=pipe.sampling_options(), history=lat, seed=0)
    torch.testing.assert_close(res.latents, ro_res.latents)


class _WanLikeCodec(VideoCodec):
    """Frame arithmetic of the Wan VAE (1 + 4k frames) with a trivial encoder."""

    latent_channels, temporal_factor, spatial_factor, causal_first_frame = 3, 4, 1, True


@pytest.mark.parametrize("frames,chunks,used", [(20, 1, 9), (30, 2, 21), (21, 2, 21), (9, 1, 9)])
def test_init_video_trimming_wan_rule(frames, chunks, used):
    x = np.zeros((frames, 8, 8, 3), np.uint8)
    x[:, 0, 0, 0] = np.arange(frames)  # frame id
    clip, info = prepare_init_video(x, _WanLikeCodec(), 8, 8, chunk_frames=3)
    assert (info["chunks"], info["frames_used"]) == (chunks, used)
    assert clip.shape == (1, 3, used, 8, 8)
    ids = ((clip[0, 0, :, 0, 0] + 1) * 127.5).round().long().tolist()
    assert ids == list(range(frames - used, frames))  # the END of the video is kept


def test_init_video_too_short_and_resize():
    with pytest.raises(PipelineError, match="needs at least 9 frames"):
        prepare_init_video(np.zeros((8, 8, 8, 3), np.uint8), _WanLikeCodec(), 8, 8, chunk_frames=3)
    clip, _ = prepare_init_video(np.zeros((4, 30, 60, 3), np.uint8), PixelShuffleVAE(2), 8, 16, chunk_frames=2)
    assert clip.shape == (1, 3, 4, 8, 16)


# ----------------------------------------------------------------------------- bad input


def _bad(tmp_path, *args):
    out = tmp_path / "bad.mp4"
    rc = cli(*args) if "--output" in args else cli(*args, "--output", out)
    assert rc == 2
    assert [p for p in tmp_path.rglob("*.mp4") if p.parent.name != "inputs"] == []  # no partial output
    return rc


def test_bad_inputs_exit_2_one_line(run_dir, tmp_path, capsys):
    cases = {
        "missing checkpoint": ("--checkpoint", tmp_path / "nope", "--prompt", "x", "--num-chunks", 1),
        "top-k 0": ("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 1, "--top-k", 0),
        "num-chunks 0": ("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 0),
        "not a number": ("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", "three"),
        "missing init video": ("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 1,
                               "--init-video", tmp_path / "none.mp4"),
        "no prompt": ("--checkpoint", run_dir, "--num-chunks", 1),
        "bad device": ("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 1, "--device", "cuda:7"),
    }
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n\n")
    cases["empty prompts file"] = ("--checkpoint", run_dir, "--prompts-file", empty, "--num-chunks", 1)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    cases["unwritable output"] = ("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 1,
                                  "--output", blocker / "sub" / "o.mp4")
    cases["output not mp4"] = ("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 1,
                               "--output", tmp_path / "o.avi")
    short = tmp_path / "inputs" / "short.mp4"
    write_mp4(short, np.zeros((1, 8, 8, 3), np.uint8), fps=4)
    cases["init video shorter than a chunk"] = ("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 1,
                                                "--init-video", short)
    cases["output under /proc"] = ("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 1,
                                   "--output", "/proc/nope/out.mp4")
    cases["huge frames"] = ("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 1,
                            "--set", "data.height=32768", "--set", "data.width=32768")
    cases["a billion chunks"] = ("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 1000000000)
    cases["history cap 0"] = ("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 1, "--max-history-chunks", 0)
    # the sampling audit's cases: each ran (or crashed with a traceback after the rollout) before
    base = ("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 2, "--steps", 1)
    board = tmp_path / "board.yaml"
    board.write_text("- {chunk: 0, prompt: a, colour: red}\n")
    expect = {
        "fps inf": (base + ("--fps", "inf"), "--fps must be a number in [0.001, 1000)"),
        "fps 1000 (reads back as 0)": (base + ("--fps", 1000), "--fps must be a number in [0.001, 1000)"),
        "fps 1e-6 (ffmpeg writes nothing)": (base + ("--fps", "1e-6"), "--fps must be a number in [0.001, 1000)"),
        "steps 1e6": (base + ("--steps", 1000000), "--steps must be in [1, 1000]"),
        "seed past int64": (base + ("--seed", 2**63), "--seed must be in [0, "),
        "empty output": (base + ("--output", ""), "--output must not be empty"),
        "negative cfg": (base + ("--cfg", -3), "--cfg must be in [0, 100]"),
        "huge cfg": (base + ("--cfg", "1e300"), "--cfg must be in [0, 100] (got 1e+300); the paper samples with 5.0"),
        "model override": (base + ("--set", "model.dim=64"), "--set model.dim=64: the checkpoint fixes model.dim = "),
        "dense with window": (base + ("--routing", "dense", "--window", 2), "--routing dense contradicts --window"),
        "window with top-k": (base + ("--routing", "window", "--top-k", 2), "--routing window contradicts --top-k"),
        "window 0": (base + ("--routing", "window", "--window", 0), "set --window, e.g. 1"),
        "record without routing": (base + ("--record-selection",), "--record-selection records routing picks"),
        "init image is a folder": (base + ("--init-image", tmp_path), "is a directory, not a file"),
        "storyboard unknown key": (("--checkpoint", run_dir, "--num-chunks", 2, "--storyboard", board),
                                   "unknown key 'colour'"),
        "no mps here": (base + ("--device", "mps"), "--device mps: MPS (Apple GPU) is not available"),
        "recache without a storyboard": (base + ("--switch-cache", "recache"), "give --prompts-at or --storyboard"),
        "host tier larger": (base + ("--dtype", "bf16", "--kv-resident-chunks", 1, "--kv-host-dtype", "fp32"),
                             "--kv-host-dtype fp32 is larger than the model's bf16"),
        "host tier fp16 under bf16": (base + ("--dtype", "bf16", "--kv-resident-chunks", 1, "--kv-host-dtype", "fp16"),
                                      "--kv-host-dtype fp16 is as large as the model's bf16 but rounds its values"),
        "lora missing": (base + ("--lora", tmp_path / "nope"), "does not exist; pass a LoRA .safetensors file"),
        "lora of a full run": (base + ("--lora", run_dir), "holds no lora.safetensors: it is not a LoRA run"),
        "lora not an adapter file": (base + ("--lora", board), "cannot read"),
        "init video not a video": (base + ("--init-video", board), f"--init-video {board}: cannot decode video"),
        "init video shorter than a chunk names the flag": (base + ("--init-video", short), f"--init-video {short}:"),
        "empty init video": (base + ("--init-video", ""), "--init-video must not be empty"),
    }
    for name, (args, text) in expect.items():
        cases[name] = args
    for name, args in cases.items():
        capsys.readouterr()
        _bad(tmp_path, *args)
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, f"{name}: {err!r}"
        if name in expect:
            assert expect[name][1] in err, f"{name}: {err!r}"
        if name in ("huge frames", "a billion chunks"):
            assert "needs at least" in err and "GiB" in err, err  # refused up front with the estimate
        if name == "output under /proc":
            assert "cannot create" in err, err
        if name == "init video not a video":
            assert err.count(str(board)) == 1, err  # PyAV's message carried the file name again
    short.unlink()
    assert not list(tmp_path.rglob("*.mp4"))


def test_mismatched_checkpoints_exit_2(tmp_path, capsys):
    # encoders of the config do not fit the weights: pixel_shuffle factor 4 gives 48 channels, model takes 12
    a = save_checkpoint_for_tests(tmp_path / "a", cfg=tiny_config(encoders=dict(vae_factor=4), data=dict(height=16, width=16)))
    assert cli("--checkpoint", a, "--prompt", "x", "--num-chunks", 1, "--output", tmp_path / "a.mp4") == 2
    assert "48 latent channels" in capsys.readouterr().err
    # weights of another size than model_config.json says
    b = save_checkpoint_for_tests(tmp_path / "b")
    ck = b / "checkpoints" / "step_0000010"
    other = CausalWanModel(tiny_config(model=dict(dim=64, num_heads=2)).model)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(ck / "model.safetensors"))
    assert cli("--checkpoint", b, "--prompt", "x", "--num-chunks", 1, "--output", tmp_path / "b.mp4") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "shape" in err and "\n" not in err
    # a raw Wan checkpoint without encoder paths (default config: Wan VAE + umT5, no paths)
    wan = tmp_path / "wan"
    wan.mkdir()
    (wan / "config.json").write_text(json.dumps(dict(dim=32, num_heads=2, ffn_dim=48, num_layers=2, in_dim=16,
                                                     out_dim=16, text_dim=4096, freq_dim=16)))
    from resampling_forcing.config import ModelConfig
    w = CausalWanModel(ModelConfig(dim=32, num_heads=2, ffn_dim=48, num_layers=2, freq_dim=16))
    save_file({k: v.contiguous() for k, v in w.state_dict().items()}, str(wan / "diffusion_pytorch_model.safetensors"))
    assert cli("--checkpoint", wan, "--prompt", "x", "--num-chunks", 1, "--output", tmp_path / "w.mp4") == 2
    err = capsys.readouterr().err.strip()
    assert "encoders" in err and "vae_path" in err and "\n" not in err
    # a run without any complete checkpoint
    c = tmp_path / "c"
    (c / "checkpoints" / "step_0000001").mkdir(parents=True)
    assert cli("--checkpoint", c, "--prompt", "x", "--num-chunks", 1, "--output", tmp_path / "c.mp4") == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.mp4"))


def test_damaged_or_configless_checkpoints(tmp_path, capsys, caplog):
    """A run whose newest checkpoint has truncated weights samples the previous whole one (named in a
    warning), as training resumes from it; that step dir given itself, a checkpoint without any
    config.yaml and an empty --checkpoint are refused in one line that names the fix."""
    run = save_checkpoint_for_tests(tmp_path / "run", step=10)
    save_checkpoint_for_tests(run, step=20, seed=1)
    newest = run / "checkpoints" / "step_0000020"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with caplog.at_level("WARNING"):
        info = resolve_checkpoint(run)
        assert info.step == 10 and "step_0000020" in caplog.text and "truncated" in caplog.text
        caplog.clear()
        weights.write_bytes(weights.read_bytes()[:-1])  # another damage: warned again, once
        assert cli("--checkpoint", run, "--prompt", "x", "--num-chunks", 1, "--steps", 1, "--output",
                   tmp_path / "ok.mp4") == 0
    assert caplog.text.count("step_0000020 is damaged") == 1, caplog.text  # the command resolves it twice
    capsys.readouterr()
    lone = save_checkpoint_for_tests(tmp_path / "lone") / "checkpoints" / "step_0000010"
    (lone / "config.yaml").unlink()
    (lone.parent.parent / "config.yaml").unlink()
    for ckpt, text in ((newest, "model.safetensors is truncated"), (lone, "has no config.yaml"),
                       ("", "--checkpoint must not be empty")):
        assert cli("--checkpoint", ckpt, "--prompt", "x", "--num-chunks", 1, "--output", tmp_path / "o.mp4") == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and text in err, err
    assert "pass another checkpoint of its run" in cli_err_of(newest, tmp_path, capsys)
    assert not (tmp_path / "o.mp4").exists()


def cli_err_of(ckpt, tmp_path, capsys) -> str:
    cli("--checkpoint", ckpt, "--prompt", "x", "--num-chunks", 1, "--output", tmp_path / "o.mp4")
    return capsys.readouterr().err


def test_cli_subprocess_exit_code_and_stderr(tmp_path):
    """The script as a user runs it: a bad flag gives one line on stderr and exit code 2."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint", str(tmp_path), "--prompt", "x",
                        "--num-chunks", "2", "--top-k", "0", "--output", str(tmp_path / "o.mp4")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--top-k must be >= 1" in r.stderr
    assert not (tmp_path / "o.mp4").exists()


def test_mp4_and_json_appear_together_and_quiet_keeps_wrote_line(run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "p" / "v.mp4"
    import resampling_forcing.mp4 as rmp4

    real = rmp4.Mp4Writer.close

    def killed(self):  # the encoder dies at the end (as under kill -9 or a full disk)
        real(self)
        raise RuntimeError("killed while encoding")

    monkeypatch.setattr(rmp4.Mp4Writer, "close", killed)
    capsys.readouterr()
    assert cli("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 1, "--output", out, "--quiet",
               "--device", "cpu") == 1  # not the input's fault: one line, exit 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out}: killed while encoding; nothing was written"), err
    assert sorted(os.listdir(out.parent)) == ["v.resume"]  # neither file, no temporaries; the chunks made
    assert err[0].endswith("(--resume continues the videos in progress)"), err
    shutil.rmtree(out.parent / "v.resume")  # start over (a leftover folder needs --resume)
    monkeypatch.setattr(rmp4.Mp4Writer, "close", real)
    stale = out.parent / ".v.abcd1234.tmp.json"  # what a kill -9 would have left
    stale.write_text("{}")
    capsys.readouterr()
    assert cli("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 1, "--output", out, "--quiet",
               "--device", "cpu") == 0
    assert sorted(os.listdir(out.parent)) == ["v.json", "v.mp4"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"wrote {out}")


def test_cli_streams_each_chunk_into_its_mp4(run_dir, tmp_path, monkeypatch):
    """The CLI writes every decoded piece into the mp4s as the rollout makes it (the video is never held
    whole: the rollout's result has none), and the files are those of saving the held video."""
    import json

    import resampling_forcing.pipeline.core as core
    from resampling_forcing.pipeline import output

    writes, results = [], []
    real_write, real_sample = output.VideoFiles.write, core.sample
    monkeypatch.setattr(output.VideoFiles, "write", lambda self, f: writes.append(len(f)) or real_write(self, f))
    monkeypatch.setattr(core, "sample", lambda *a, **k: results.append(real_sample(*a, **k)) or results[-1])
    out = tmp_path / "s"
    assert cli("--checkpoint", run_dir, "--prompt", "a red circle", "--prompt", "a blue square", "--batch", 2,
               "--num-chunks", 3, "--seed", 5, "--output", f"{out}/", "--quiet", "--device", "cpu") == 0
    assert writes == [CF] * 6 and len(results) == 1 and results[0].video is None and results[0].streamed
    assert results[0].latents is None  # nor the latents: nothing on the host grows with --num-chunks
    held = Pipeline.from_pretrained(run_dir).generate(["a red circle", "a blue square"], 3, seed=5)
    assert held.video is not None and held.num_frames == 3 * CF
    for b, name in enumerate(["000_a_red_circle", "001_a_blue_square"]):
        ref = tmp_path / "ref" / f"{name}.mp4"
        output.save_video(ref, held.video[b], {}, fps=json.loads((out / f"{name}.json").read_text())["fps"])
        assert (out / f"{name}.mp4").read_bytes() == ref.read_bytes()
        assert json.loads((out / f"{name}.json").read_text())["frames"] == 3 * CF


def test_cli_full_disk_names_the_video_and_keeps_the_finished_ones(run_dir, tmp_path, capsys, monkeypatch):
    """A full disk while finishing the second video of a batch: one line naming that video (not a temporary,
    not the first), exit 2; the first video stays whole with its JSON, nothing of the second is left."""
    import errno

    import resampling_forcing.mp4 as rmp4

    real = rmp4.Mp4Writer.close

    def close(self):
        if ".001_" in self.path.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real(self)

    monkeypatch.setattr(rmp4.Mp4Writer, "close", close)
    out = tmp_path / "o"
    capsys.readouterr()
    assert cli("--checkpoint", run_dir, "--prompt", "a", "--prompt", "b", "--batch", 2, "--num-chunks", 1,
               "--output", f"{out}/", "--quiet", "--device", "cpu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"no space left on {out} (writing 001_b.mp4); free some space, then --resume continues "
                            "the videos in progress"), err
    # the batch's chunks stay until every video of it is written: --resume then denoises nothing again
    assert sorted(os.listdir(out)) == ["000_a.json", "000_a.mp4", "000_a.resume", "001_b.resume"]
    monkeypatch.setattr(rmp4.Mp4Writer, "close", real)  # space freed
    monkeypatch.setattr(sampler.Rollout, "next_chunk", lambda *a, **k: pytest.fail("a kept chunk denoised again"))
    assert cli("--checkpoint", run_dir, "--prompt", "a", "--prompt", "b", "--batch", 2, "--num-chunks", 1,
               "--output", f"{out}/", "--quiet", "--device", "cpu", "--resume") == 0
    assert sorted(os.listdir(out)) == ["000_a.json", "000_a.mp4", "001_b.json", "001_b.mp4"]
    assert read_mp4(out / "001_b.mp4").shape[0] == json.loads((out / "001_b.json").read_text())["frames"]


def test_cli_output_cleaned_by_another_run(run_dir, tmp_path, capsys, monkeypatch):
    """A second sample.py writing the same outputs removes the first one's temporaries at its start (stale
    ones, it takes them for): the first run then says so in one line, exit 1, and leaves nothing."""
    from resampling_forcing.io import clean_stale_temps
    from resampling_forcing.pipeline import output

    real = output.VideoFiles.write

    def write(self, frames):
        real(self, frames)
        clean_stale_temps(self.path)  # what the other run's start does

    monkeypatch.setattr(output.VideoFiles, "write", write)
    out = tmp_path / "v.mp4"
    capsys.readouterr()
    assert cli("--checkpoint", run_dir, "--prompt", "a", "--num-chunks", 2, "--output", out, "--quiet",
               "--device", "cpu") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was removed while being written (another process writing the same outputs?)" in err[0]
    assert os.listdir(tmp_path) == ["v.resume"]  # the chunks made, for --resume


def test_init_video_is_resampled_to_the_model_fps_and_capped(run_dir, tmp_path):
    """A 16 fps clip for a 4 fps model: every 4th frame; --max-history-chunks keeps the last chunks only."""
    src = np.zeros((32, 8, 8, 3), np.uint8)
    src[:, 0, 0, 0] = np.arange(32) * 8  # frame id
    vid = write_mp4(tmp_path / "fast.mp4", src, fps=16)
    out = tmp_path / "c.mp4"
    assert cli("--checkpoint", run_dir, "--prompt", "x", "--num-chunks", 1, "--output", out, "--init-video", vid,
               "--max-history-chunks", 2, "--quiet", "--device", "cpu") == 0
    info = json.loads(out.with_suffix(".json").read_text())["init_video"]
    assert info["source_frames"] == 32 and info["source_fps"] == pytest.approx(16) and info["fps"] == 4.0
    assert info["frames_in"] == 8 and info["chunks"] == 2 and info["frames_used"] == 4
    assert info["max_history_chunks"] == 2


# ----------------------------------------------------------------------------- the Python API's bad arguments


def _api_cases(pipe):
    g = dict(steps=1)
    return {
        "a billion chunks": (lambda: pipe.generate("a", 10**9, **g), "needs at least"),
        "dense with top_k": (lambda: pipe.generate("a", 1, routing="dense", top_k=2, **g), "contradicts top_k"),
        "window with top_k": (lambda: pipe.generate("a", 1, routing="window", top_k=2, window=1, **g),
                              "contradicts top_k"),
        "routing_layers out of range": (lambda: pipe.sampling_options(top_k=1, routing_layers=[99]), "< 2 (the model's blocks)"),
        "routing_layers a string": (lambda: pipe.sampling_options(top_k=1, routing_layers="all"), "routing_layers"),
        "options= too deep": (lambda: pipe.generate("a", 1, options=SamplingOptions(routing_layers=[0, 99])),
                              "routing_layers=[0, 99]: must be a non-empty list"),
        "record_selection a string": (lambda: pipe.generate("a", 1, record_selection="no", **g), "record_selection"),
        "decode a string": (lambda: pipe.generate("a", 1, decode="no", **g), "decode must be True or False"),
        "prompt an int": (lambda: pipe.generate(5, 1, **g), "prompts: a string or a list of strings"),
        "prompt a list of ints": (lambda: pipe.generate([1, 2], 1, **g), "prompts: a string or a list of strings"),
        "negative prompt an int": (lambda: pipe.generate("a", 1, negative_prompt=5, **g), "negative_prompt"),
        "shift a string": (lambda: pipe.generate("a", 1, shift="2", **g), "shift must be a number"),
        "shift huge": (lambda: pipe.generate("a", 1, shift=1e308, **g), "shift must be in (0, 1e6]"),
        "cfg a bool": (lambda: pipe.generate("a", 1, cfg_scale=True, **g), "cfg_scale must be a number"),
        "seed None": (lambda: pipe.generate("a", 1, seed=None, **g), "seed=None"),
        "callback not callable": (lambda: pipe.generate("a", 1, callback="x", **g), "callback must be callable"),
        "video_sink not callable": (lambda: pipe.generate("a", 1, video_sink=[], **g), "video_sink must be callable"),
        "video_sink without decode": (lambda: pipe.generate("a", 1, video_sink=print, decode=False, **g),
                                      "needs decode=True"),
        "options a string": (lambda: pipe.generate("a", 1, options="x"), "options: a SamplingOptions"),
        "indices a string": (lambda: pipe.generate("a", 1, indices="0", **g), "indices="),
        "generator a string": (lambda: pipe("a", num_frames=2, num_inference_steps=1, generator="abc"), "generator"),
        "generate's steps in pipe()": (lambda: pipe("a", num_frames=2, steps=1), "num_inference_steps="),
        "generate's callback in pipe()": (lambda: pipe("a", num_frames=2, num_inference_steps=1, callback=print),
                                          "callback_on_chunk_end="),
        "fps 0": (lambda: pipe("a", num_frames=2, num_inference_steps=1, fps=0), "fps must be a number in [0.001, 1000) (got 0)"),
        "generator and seed": (lambda: pipe("a", num_frames=2, num_inference_steps=1, generator=3, seed=5),
                               "generator= (diffusers' name) or seed=, not both"),
        "indices of another length": (lambda: pipe.generate(["a", "b"], 1, indices=[0], **g),
                                      "indices: 1 sample indices for 2 prompts"),
    }


def test_api_bad_arguments_raise_one_named_error_before_any_work(run_dir, monkeypatch):
    """Each bad argument of generate / pipe(...) / sampling_options is one PipelineError naming it, raised
    before any model forward (they were deep torch errors mid-rollout, allocator failures, or silently
    accepted: a 'no' string recorded selections, a dense routing dropped top_k)."""
    pipe = Pipeline.from_pretrained(run_dir, device="cpu")
    forwards = []
    inner = pipe.model.forward
    monkeypatch.setattr(pipe.model, "forward", lambda *a, **k: forwards.append(1) or inner(*a, **k))
    for name, (call, text) in _api_cases(pipe).items():
        with pytest.raises(PipelineError) as e:
            call()
        assert text in str(e.value) and "\n" not in str(e.value), f"{name}: {e.value}"
        assert not forwards, f"{name}: the model ran before the error"


def test_api_indices_refused_before_an_init_video_is_encoded(run_dir, monkeypatch):
    """pipe(..., init_video=, indices=) with one index per prompt missing: refused before the video is
    encoded (the same error came only after encoding it)."""
    pipe = Pipeline.from_pretrained(run_dir, device="cpu")
    monkeypatch.setattr(pipe, "load_init_video", lambda *a, **k: pytest.fail("the video was encoded first"))
    with pytest.raises(PipelineError, match="indices: 1 sample indices for 2 prompts"):
        pipe(["a", "b"], num_frames=None, init_video=np.zeros((9, 32, 32, 3), np.uint8), indices=[0])


def test_api_sidecar_records_the_generated_size(run_dir, tmp_path):
    """height= / width= of one call: the JSON names that size (it named the config's)."""
    pipe = Pipeline.from_pretrained(run_dir, device="cpu")
    out = pipe("a red circle bouncing", num_frames=None, height=16, width=48, num_inference_steps=1)
    meta = out.save(tmp_path / "hw.mp4")[0].with_suffix(".json")
    info = json.loads(meta.read_text())["pipeline"]
    assert out.frames.shape[2:4] == (16, 48)
    assert info["resolution"] == [16, 48] and info["latent_hw"] == list(out.result.latents.shape[-2:])


def test_api_memory_check_counts_an_init_video(run_dir, monkeypatch):
    """generate(init_video=...): the memory check counts the video's history chunks (it counted none, so
    a long init video could fail during prefill instead of with the one-line refusal)."""
    import resampling_forcing.memory as M

    pipe = Pipeline.from_pretrained(run_dir, device="cpu")
    seen = []
    real = M.rollout_need
    monkeypatch.setattr(M, "rollout_need", lambda *a, **k: seen.append(a[-1] if len(a) > 5 else k.get("history_chunks"))
                        or real(*a, **k))
    video = np.zeros((pipe.vae.frames_for_latents(4 * pipe.chunk_frames), 32, 32, 3), np.uint8)
    res = pipe.generate("a", 1, steps=1, init_video=video, decode=False)
    assert seen == [res.init_video["chunks"]] and seen[0] >= 2, seen


def test_api_save_refuses_a_bad_path(run_dir, tmp_path, monkeypatch):
    pipe = Pipeline.from_pretrained(run_dir, device="cpu")
    out = pipe("a", num_frames=None, num_inference_steps=1)
    monkeypatch.chdir(tmp_path)
    for bad in (None, 5, ""):  # wrote into the working directory before
        with pytest.raises(PipelineError, match="save: path must be a non-empty str or Path"):
            out.save(bad)
    with pytest.raises(PipelineError, match="sample index"):
        out.save_one(5, tmp_path / "x.mp4")
    assert not list(tmp_path.iterdir())


def test_api_init_pixels_and_loading_arguments_are_checked(run_dir, tmp_path):
    """Init frames: uint8 or float in [-1, 1] only (a float image in 0..255 gave a white history, NaN or an
    int64 array went through); from_pretrained's arguments of the wrong type are named (pathlib TypeErrors,
    a str of overrides split into characters, fp64 or int8 weights)."""
    pipe = Pipeline.from_pretrained(run_dir, device="cpu")
    bad_frames = {"float 0..255": np.full((8, 8, 3), 200.0, np.float32), "NaN": np.full((8, 8, 3), np.nan, np.float32),
                  "int64": np.zeros((8, 8, 3), np.int64), "empty": np.zeros((0, 0, 3), np.uint8)}
    for name, frames in bad_frames.items():
        with pytest.raises(PipelineError, match="init image: "):
            pipe.load_init_image(frames)
        with pytest.raises(PipelineError, match="init video: "):
            pipe.load_init_video(np.stack([frames] * 4))
    pipe.load_init_image(np.zeros((8, 8, 3), np.uint8))
    pipe.load_init_image(np.zeros((3, 8, 8), np.float32))
    # a bad file is named by the pipeline with the input's name (the CLI passes its flag), one line
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 64)
    for what, path, text in (("init video", tmp_path / "none.mp4", "no such video file"),
                             ("--init-video", junk, "cannot decode video")):
        with pytest.raises(PipelineError, match=f"^{what} {path}: {text}") as e:
            pipe.load_init_video(path, what=what) if what != "init video" else pipe.load_init_video(path)
        assert "\n" not in str(e.value)
    fast = write_mp4(tmp_path / "fast.mp4", np.zeros((3, 8, 8, 3), np.uint8), fps=999)  # 3 ms of video
    with pytest.raises(PipelineError, match=r"fast\.mp4: 1 frame at the model's [\d.]+ fps \(3 in the file, at 999 fps\)"):
        pipe.load_init_video(fast)  # the count after resampling, said as such
    for kw, text in ((dict(path=None), "path: "), (dict(path=5), "path: "), (dict(config=5), "config: "),
                     (dict(overrides="diffusion.sample_steps=2"), "overrides: "),
                     (dict(dtype=torch.float64), "not supported"), (dict(use_ema="no"), "use_ema")):
        path = kw.pop("path", run_dir)
        with pytest.raises(PipelineError, match=text):
            Pipeline.from_pretrained(path, device="cpu", **kw)


def test_api_parity_with_the_cli(run_dir, monkeypatch):
    """What the CLI refuses the API refuses too: an override of a model key the checkpoint fixes, a host
    tier larger than the model dtype, switch_cache='recache' without a storyboard; and pipe(...) checks the
    prompts before it encodes an init video."""
    with pytest.raises(PipelineError, match="model.dim=64: the checkpoint fixes model.dim"):
        Pipeline.from_pretrained(run_dir, device="cpu", overrides=["model.dim=64"])
    pipe = Pipeline.from_pretrained(run_dir, device="cpu", dtype="bf16")
    with pytest.raises(PipelineError, match="kv_host_dtype fp32 is larger than the model's bf16"):
        pipe.generate("a", 2, steps=1, kv_resident_chunks=1, kv_host_dtype="fp32")
    with pytest.raises(PipelineError, match="switch_cache='recache' acts at a prompt switch"):
        pipe.generate("a", 2, steps=1, switch_cache="recache")
    encoded = []
    monkeypatch.setattr(pipe, "_encode", lambda clip: encoded.append(1))
    with pytest.raises(PipelineError, match="prompts: a string or a list of strings"):
        pipe(5, num_frames=4, init_video=np.zeros((8, 8, 8, 3), np.uint8))
    with pytest.raises(PipelineError, match="max_history_chunks=0"):
        pipe("a", num_frames=4, init_video=np.zeros((8, 8, 8, 3), np.uint8), max_history_chunks=0)
    assert not encoded


def test_history_cap_default_is_one_value():
    """The CLI's --max-history-chunks and the API's max_history_chunks default to one value (they were
    16 chunks and every chunk)."""
    import inspect

    from resampling_forcing.memory import MAX_HISTORY_CHUNKS

    api = inspect.signature(Pipeline.generate).parameters["max_history_chunks"].default
    cli_default = load_sample_cli().build_parser().get_default("max_history_chunks")
    assert api == cli_default == MAX_HISTORY_CHUNKS


def test_seconds_gives_the_length(run_dir, tmp_path, capsys):
    """--seconds S: at least S seconds after the history at data.fps (4 here), rounded up to whole chunks."""
    from resampling_forcing.config import load_config
    from resampling_forcing.memory import chunks_for_seconds

    cfg = load_config(REPO / "configs" / "wan1.3b_stage1_tf.yaml")  # Wan VAE, 3-frame chunks, 16 fps
    assert chunks_for_seconds(cfg, 5.0, history=False) == 7  # 81 frames: the paper's 5 s clip
    assert chunks_for_seconds(cfg, 60.0, history=False) == 81  # 969 frames >= 960
    assert chunks_for_seconds(cfg, 5.0, history=True) == 7  # 84 frames >= 80 after a history
    assert chunks_for_seconds(cfg, 0.01, history=False) == 1
    out = tmp_path / "s.mp4"
    capsys.readouterr()
    assert cli("--checkpoint", run_dir, "--prompt", "x", "--seconds", 2.2, "--output", out, "--device", "cpu") == 0
    assert read_mp4(out).shape[0] == 5 * CF  # 8.8 frames at 4 fps -> 9 -> 5 chunks of 2 frames
    assert json.loads(out.with_suffix(".json").read_text())["num_chunks"] == 5
    assert "--seconds 2.2: 5 chunks, 10 frames (2.50 s at 4 fps)" in capsys.readouterr().err
    # the seconds of the file written: at --fps 8, twice the frames; after an image's history chunk
    import imageio.v3 as iio

    img = tmp_path / "first.png"
    iio.imwrite(img, np.full((8, 8, 3), 90, np.uint8))
    out2 = tmp_path / "s2.mp4"
    assert cli("--checkpoint", run_dir, "--prompt", "x", "--seconds", 2.2, "--fps", 8, "--init-image", img,
               "--output", out2, "--device", "cpu") == 0
    assert json.loads(out2.with_suffix(".json").read_text())["num_chunks"] == 9  # 17.6 -> 18 frames, 2 a chunk
    assert "--seconds 2.2: 9 chunks, 18 frames (2.25 s at 8 fps)" in capsys.readouterr().err
    for args, words in ((("--num-chunks", 2, "--seconds", 1), "one of them"), ((), "--num-chunks N or --seconds S"),
                        (("--seconds", 0), "--seconds must be a number > 0"),
                        (("--seconds", "nan"), "--seconds must be a number > 0"),
                        (("--seconds", 1, "--prompts-at", "0:a;3:b"), "--seconds 1 makes 2 chunks"),
                        (("--seconds", 1e308), "is over 10^8 frames")):
        prompt = () if "--prompts-at" in args else ("--prompt", "x")
        assert cli("--checkpoint", run_dir, *prompt, *args, "--output", tmp_path / "bad.mp4", "--device", "cpu") == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and words in err, (args, err)
    assert not (tmp_path / "bad.mp4").exists()


def test_a_model_override_equal_to_the_checkpoints_value_is_accepted_however_written(run_dir):
    """--set model.eps=1e-6 (a string to YAML: no dot) equals the checkpoint's 1e-06 and is accepted, as
    0.000001 is; another value is refused in one line."""
    from resampling_forcing.pipeline import resolve_config
    from resampling_forcing.pipeline.loading import check_model_overrides

    cfg = resolve_config(run_dir)
    assert cfg.model.eps == 1e-6
    for same in ("model.eps=1e-6", "model.eps=0.000001", "model.eps=1E-6"):
        check_model_overrides(cfg, [same])
    with pytest.raises(PipelineError, match=r"model.eps=1e-5: the checkpoint fixes model.eps = 1e-06"):
        check_model_overrides(cfg, ["model.eps=1e-5"])


def test_pipe_generator_gives_the_seed_it_draws(run_dir):
    """pipe(generator=torch.Generator) (diffusers' idiom) draws its seed from the generator where the
    generator lives (a CUDA generator failed on the CPU draw): the same video as that seed."""
    pipe = Pipeline.from_pretrained(run_dir, device="cpu")
    a = pipe("a", num_frames=2, num_inference_steps=1, generator=torch.Generator().manual_seed(7))
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(7)))
    b = pipe("a", num_frames=2, num_inference_steps=1, seed=seed)
    c = pipe("a", num_frames=2, num_inference_steps=1, seed=seed + 1)
    assert a.seed == b.seed == seed and torch.equal(a.latents, b.latents) and not torch.equal(a.latents, c.latents)
