"""Issue 14: prompt switching (storyboards) on the sampler, the pipeline and the CLI.

- a one-entry storyboard is the plain call, bit for bit;
- a switch at chunk s leaves chunks < s bit-identical to the no-switch rollout and changes the
  chunks from s on;
- "recache" re-writes the cached history under the new text: it equals a fresh rollout on the new
  text prefilled with the same history latents (same noise from then on), and re-caching under
  the SAME text changes nothing.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from resampling_forcing.options import SamplingOptions
from resampling_forcing.sampler import Rollout, sample
from resampling_forcing.storyboard import check_storyboard
from helpers import tiny_model

H, W = 2, 14
# tiny tensors: threads only add overhead (and stall on a busy machine)
pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "assets" / "tiny-pretrained"


def _ctx(seed, b=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 5, 8, generator=g)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_sampler_storyboard_one_entry_and_switch(cfg_scale):
    model = tiny_model()
    opts = SamplingOptions(steps=2, cfg_scale=cfg_scale)
    a, b, neg = _ctx(1), _ctx(2), _ctx(3)
    kw = dict(neg_context=neg, options=opts, seed=4, decode=False)
    plain = sample(model, a, 5, (H, W), **kw).latents
    one = sample(model, None, 5, (H, W), storyboard=[(0, a)], **kw).latents
    assert torch.equal(plain, one)
    cf = model.cfg.chunk_frames
    for mode in ("keep", "recache"):
        sw = sample(model, a, 5, (H, W), storyboard=[(3, b)], switch_cache=mode, **kw).latents
        assert torch.equal(sw[:, :, :3 * cf], plain[:, :, :3 * cf]), mode
        for c in range(3, 5):
            assert not torch.equal(sw[:, :, c * cf:(c + 1) * cf], plain[:, :, c * cf:(c + 1) * cf]), (mode, c)
    keep = sample(model, a, 5, (H, W), storyboard=[(3, b)], **kw).latents
    rec = sample(model, a, 5, (H, W), storyboard=[(3, b)], switch_cache="recache", **kw).latents
    assert not torch.equal(keep[:, :, 3 * cf:], rec[:, :, 3 * cf:])
    # re-caching under the same text is a no-op
    same = sample(model, a, 5, (H, W), storyboard=[(2, a)], switch_cache="recache", **kw).latents
    assert torch.equal(same, plain)


@pytest.mark.parametrize("context_t", [0.0, 0.3])
def test_recache_equals_fresh_rollout_on_the_new_text(context_t):
    model = tiny_model()
    opts = SamplingOptions(steps=2, cfg_scale=2.0, context_t=context_t)
    a, b, neg = _ctx(1, 2), _ctx(2, 2), _ctx(3)
    ro = Rollout(model, a, latent_hw=(H, W), neg_context=neg, options=opts, seed=7)
    chunks = [ro.next_chunk() for _ in range(3)]
    ro.flush()
    written = list(ro.written)
    noise_state = [g.get_state() for g in ro.noise.generators]
    ro.set_context(b, recache=True)
    got = ro.next_chunk()

    fresh = Rollout(model, b, latent_hw=(H, W), neg_context=neg, options=opts, seed=7)
    for x in written:  # the same model inputs (re-noised ones for context_t > 0)
        _write_exact(fresh, x)
    for g, st in zip(fresh.noise.generators, noise_state):
        g.set_state(st)
    want = fresh.next_chunk()
    assert torch.equal(got, want)
    assert len(chunks) == 3


def _write_exact(ro, x):
    """Write a chunk whose (already re-noised) model input is x: no re-noising, t = context_t."""
    opts, t_of = ro.options, ro._t
    ro.options = dataclasses.replace(opts, context_t=0.0)
    ro._t = lambda _t: t_of(opts.context_t)
    try:
        ro.write_chunk(x)
    finally:
        ro.options, ro._t = opts, t_of


def test_set_context_checks_shape():
    model = tiny_model()
    ro = Rollout(model, _ctx(1), latent_hw=(H, W), options=SamplingOptions(steps=1, cfg_scale=1.0))
    with pytest.raises(ValueError, match="context must be"):
        ro.set_context(_ctx(1, 2))


def test_check_storyboard_errors():
    assert check_storyboard([(8, "b"), (0, "a")], 10) == [(0, "a"), (8, "b")]
    with pytest.raises(ValueError, match="only 4 chunks"):
        check_storyboard([(0, "a"), (4, "b")], 4)
    with pytest.raises(ValueError, match="two entries for chunk 2"):
        check_storyboard([(2, "a"), (2, "b")])
    with pytest.raises(ValueError, match="int >= 0"):
        check_storyboard([(-1, "a")])
    with pytest.raises(ValueError, match="empty"):
        check_storyboard([])


# ----------------------------------------------------------------------------- pipeline + CLI (tiny-pretrained)


@pytest.fixture(scope="module")
def pipe():
    from resampling_forcing.pipeline import Pipeline

    return Pipeline.from_pretrained(TINY, device="cpu")


RED, BLUE = "a red circle bouncing", "a blue circle bouncing"


def test_pipeline_storyboard(pipe):
    cf = pipe.chunk_frames
    kw = dict(seed=3, steps=3)
    plain = pipe.generate([RED], 4, **kw)
    one = pipe.generate(None, 4, storyboard=[(0, RED)], **kw)
    assert torch.equal(plain.latents, one.latents) and torch.equal(plain.video, one.video)
    assert one.storyboard == [dict(chunk=0, prompt=RED)] and one.prompts == [RED]
    for mode in ("keep", "recache"):
        sw = pipe.generate(None, 4, storyboard="0:%s;2:%s" % (RED, BLUE), switch_cache=mode, **kw)
        assert sw.storyboard == [dict(chunk=0, prompt=RED), dict(chunk=2, prompt=BLUE)] and sw.switch_cache == mode
        assert torch.equal(sw.latents[:, :, :2 * cf], plain.latents[:, :, :2 * cf])
        f2 = pipe.frames_for_chunks(2)
        assert torch.equal(sw.video[:, :f2], plain.video[:, :f2])
        assert not torch.equal(sw.latents[:, :, 2 * cf:3 * cf], plain.latents[:, :, 2 * cf:3 * cf])
    # prompts + switches later; a list per entry for a batch
    a = pipe.generate(RED, 4, storyboard=[(2, BLUE)], **kw)
    assert torch.equal(a.latents, pipe.generate(None, 4, storyboard={0: RED, 2: BLUE}, **kw).latents)
    batch = pipe.generate([RED, BLUE], 4, storyboard=[(2, [BLUE, RED])], **kw)
    plain2 = pipe.generate([RED, BLUE], 4, **kw)
    assert torch.equal(batch.latents[:, :, :2 * cf], plain2.latents[:, :, :2 * cf])
    # sample 0 of the batch follows the same storyboard as `a`; batch composition changes the
    # model's arithmetic in the last bits (test_sampler checks that at 1e-5 on the random tiny
    # model; four chunks of the trained one amplify it to ~6e-5)
    torch.testing.assert_close(batch.latents[:1], a.latents, rtol=1e-3, atol=2e-4)
    assert (batch.latents[:1, :, 2 * cf:] - plain2.latents[:1, :, 2 * cf:]).abs().max() > 1e-2


def test_pipeline_storyboard_errors(pipe, tmp_path):
    from resampling_forcing.pipeline import PipelineError, parse_storyboard

    with pytest.raises(PipelineError, match="only 4 chunks"):
        pipe.generate(None, 4, storyboard=[(0, RED), (4, BLUE)], steps=1)
    with pytest.raises(PipelineError, match="chunk 0 and prompts"):
        pipe.generate(RED, 4, storyboard=[(0, RED)], steps=1)
    with pytest.raises(PipelineError, match="no prompts"):
        pipe.generate(None, 4, storyboard=[(1, RED)], steps=1)
    with pytest.raises(PipelineError, match="switch_cache"):
        pipe.generate(RED, 4, storyboard=[(1, BLUE)], switch_cache="drop", steps=1)
    with pytest.raises(PipelineError, match="CHUNK:PROMPT"):
        parse_storyboard("a red ball")
    with pytest.raises(PipelineError, match="not an int"):
        parse_storyboard("x:a red ball")
    with pytest.raises(PipelineError, match="non-empty string"):
        parse_storyboard("0:")
    f = tmp_path / "s.yaml"
    f.write_text("- {chunk: 0, prompt: a red ball}\n- {chunk: 3, prompt: a blue ball}\n")
    assert parse_storyboard(f) == [(0, "a red ball"), (3, "a blue ball")]
    j = tmp_path / "s.json"
    j.write_text(json.dumps({"0": "a", "5": "b"}))
    assert parse_storyboard(str(j)) == [(0, "a"), (5, "b")]
    # inline text whose last prompt ends like a file name is text, not a file to open
    assert parse_storyboard("0:a cat;2:a sign reading config.yaml") == [(0, "a cat"), (2, "a sign reading config.yaml")]
    j.write_text("{not json")
    with pytest.raises(PipelineError, match="not valid JSON/YAML"):
        parse_storyboard(j)


def _cli():
    from helpers import load_sample_cli

    mod = load_sample_cli()
    return lambda *a: mod.main([str(x) for x in a])


def test_cli_prompts_at_and_storyboard_file(tmp_path, capsys):
    cli = _cli()
    base = ["--checkpoint", TINY, "--num-chunks", 3, "--steps", 2, "--device", "cpu", "--quiet"]
    assert cli(*base, "--prompt", RED, "--output", tmp_path / "plain.mp4") == 0
    assert cli(*base, "--prompts-at", f"0:{RED};2:{BLUE}", "--output", tmp_path / "sw.mp4") == 0
    f = tmp_path / "board.yaml"
    f.write_text(f"- {{chunk: 0, prompt: {RED}}}\n- {{chunk: 2, prompt: {BLUE}}}\n")
    assert cli(*base, "--storyboard", f, "--switch-cache", "recache", "--output", tmp_path / "rc.mp4") == 0
    meta = json.loads((tmp_path / "sw.json").read_text())
    assert meta["storyboard"] == [dict(chunk=0, prompt=RED), dict(chunk=2, prompt=BLUE)]
    assert meta["switch_cache"] == "keep" and meta["prompt"] == RED
    assert json.loads((tmp_path / "rc.json").read_text())["switch_cache"] == "recache"
    assert json.loads((tmp_path / "plain.json").read_text())["storyboard"] is None
    from resampling_forcing.mp4 import read_mp4

    plain, sw, rc = (read_mp4(tmp_path / f"{n}.mp4") for n in ("plain", "sw", "rc"))
    assert plain.shape == sw.shape == rc.shape
    # one-entry storyboard == plain; before the switch equal (mp4 coding aside: same input -> same bytes)
    assert cli(*base, "--prompts-at", f"0:{RED}", "--output", tmp_path / "one.mp4") == 0
    assert np.array_equal(read_mp4(tmp_path / "one.mp4"), plain)
    assert not np.array_equal(sw, plain) and not np.array_equal(rc, sw)
    capsys.readouterr()
    bad = [(["--prompts-at", f"1:{RED}"], "entry at chunk 0"),
           (["--prompts-at", f"0:{RED};3:{BLUE}"], "--num-chunks is 3"),
           (["--prompts-at", "0 a red ball"], "CHUNK:PROMPT"),
           (["--prompts-at", f"0:{RED}", "--prompt", RED], "drop --prompt"),
           (["--storyboard", tmp_path / "missing.yaml"], "no such file"),
           (["--prompts-at", f"0:{RED}", "--switch-cache", "drop"], "invalid choice")]
    for args, msg in bad:
        assert cli(*base, *args, "--output", tmp_path / "bad.mp4") == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err, (args, err)
    assert not (tmp_path / "bad.mp4").exists()


def _png(path, arr):
    from PIL import Image

    Image.fromarray(arr).save(path)


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, w)[None, :]
    img[..., 1] = np.linspace(255, 0, h)[:, None]
    img[h // 4: h // 2, w // 4: w // 2] = (250, 20, 20)
    return np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)


def test_init_image_first_frame_is_the_image(pipe, tmp_path):
    from resampling_forcing.data.video import resize_center_crop

    h, w = pipe.config.data.height, pipe.config.data.width
    for shape in ((h, w), (3 * h // 2, 2 * w + 6)):  # same size; larger and wider: resize + centre crop
        img = _image(*shape)
        _png(tmp_path / "img.png", img)
        res = pipe.generate(RED, 2, steps=2, init_image=tmp_path / "img.png")
        cf = pipe.chunk_frames
        assert res.history_chunks == 1 and res.history_frames == pipe.frames_for_chunks(1)
        assert res.latents.shape[2] == 3 * cf and res.video.shape[1] == pipe.frames_for_chunks(3)
        assert res.init_video["kind"] == "image" and res.init_video["image_size"] == list(shape)
        want = resize_center_crop(torch.from_numpy(img).permute(2, 0, 1)[:, None].float() / 127.5 - 1, h, w)
        # the VAE's own reconstruction error of that frame (uint8 rounding on top)
        lat = pipe.vae.encode(want[None].expand(-1, -1, pipe.frames_for_chunks(1), -1, -1))
        recon = pipe.vae.decode(lat)[0, :, 0]
        vae_err = float((recon - want[:, 0]).abs().max()) * 127.5
        got = res.video[0, 0].permute(2, 0, 1).float()
        ref = (want[:, 0] + 1) * 127.5
        assert float((got - ref).abs().max()) <= vae_err + 0.51, (shape, vae_err)
        # every history frame is the image (the chunk is the image repeated)
        assert torch.equal(res.video[0, 0], res.video[0, res.history_frames - 1])
        # the generated chunks follow it: not a copy of the image
        assert not torch.equal(res.video[0, -1], res.video[0, 0])


def test_init_image_bad_files_exit_2(tmp_path, capsys):
    cli = _cli()
    (tmp_path / "text.png").write_text("hello, not an image\n")
    _png(tmp_path / "good.png", _image(32, 32))
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    base = ["--checkpoint", TINY, "--num-chunks", 1, "--steps", 1, "--device", "cpu", "--quiet", "--prompt", RED]
    for name, msg in (("missing.png", "no such file"), ("text.png", "not an image file"),
                      ("trunc.png", "corrupt or truncated")):
        assert cli(*base, "--init-image", tmp_path / name, "--output", tmp_path / "o.mp4") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err and "--init-image" in err, err
    assert cli(*base, "--init-image", tmp_path / "good.png", "--init-video", tmp_path / "good.png",
               "--output", tmp_path / "o.mp4") == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()
    assert cli(*base, "--init-image", tmp_path / "good.png", "--output", tmp_path / "o.mp4") == 0
    meta = json.loads((tmp_path / "o.json").read_text())
    assert meta["init_image"]["kind"] == "image" and meta["history_chunks"] == 1 and meta["init_video"] is None


def test_pipeline_call_like_diffusers(pipe, tmp_path):
    from resampling_forcing.pipeline import PipelineError, PipelineOutput

    f3 = pipe.frames_for_chunks(3)
    seen = []
    out = pipe(RED, num_frames=f3, num_inference_steps=2, guidance_scale=2.0, negative_prompt="",
               generator=torch.Generator().manual_seed(5), callback_on_chunk_end=lambda p, i, c: seen.append(i))
    assert isinstance(out, PipelineOutput) and out.frames.shape[:2] == (1, f3) and seen == [0, 1, 2]
    again = pipe(RED, num_frames=f3, num_inference_steps=2, guidance_scale=2.0,
                 generator=torch.Generator().manual_seed(5))
    assert torch.equal(out.frames, again.frames)
    # one implementation: the call is generate() with the chunk arithmetic done
    gen = pipe.generate(RED, 3, seed=out.seed, steps=2, cfg_scale=2.0, negative_prompt="")
    assert torch.equal(gen.video, out.frames)
    paths = out.save(tmp_path / "call.mp4")
    meta = json.loads((tmp_path / "call.json").read_text())
    assert paths == [tmp_path / "call.mp4"] and meta["frames"] == f3 and meta["seed"] == out.seed
    assert meta["prompt"] == RED and meta["sampling"]["steps"] == 2
    from resampling_forcing.mp4 import read_mp4

    assert read_mp4(tmp_path / "call.mp4").shape[0] == f3
    # lists of prompts with a negative prompt each; other sizes; early stop
    outs = pipe([RED, BLUE], num_frames=pipe.frames_for_chunks(1), num_inference_steps=1,
                negative_prompt=["", "a green square"], height=16, width=48)
    assert outs.frames.shape == (2, pipe.frames_for_chunks(1), 16, 48, 3)
    assert outs.result.negative_prompt == ["", "a green square"]
    assert [p.name for p in outs.save(tmp_path / "two")] == ["000_a_red_circle_bouncing.mp4",
                                                             "001_a_blue_circle_bouncing.mp4"]
    stop = pipe(RED, num_frames=f3, num_inference_steps=1, callback_on_chunk_end=lambda p, i, c: i < 1)
    assert stop.result.timings["generated_chunks"] == 2
    with pytest.raises(PipelineError, match=r"num_frames=5 is not a whole number of chunks.*use 4 or 6"):
        pipe(RED, num_frames=5)
    with pytest.raises(PipelineError, match="multiple of 8"):
        pipe(RED, num_frames=2, height=20)
    with pytest.raises(PipelineError, match="one per prompt"):
        pipe([RED, BLUE], num_frames=2, negative_prompt=["x"])
    # with an init image, num_frames counts the history's frames too
    _png(tmp_path / "i.png", _image(32, 32))
    o = pipe(RED, num_frames=f3, num_inference_steps=1, init_image=tmp_path / "i.png")
    assert o.frames.shape[1] == f3 and o.result.history_chunks == 1


def test_hub_id_resolves_offline_through_the_local_cache(tmp_path, monkeypatch):
    """pipe = Pipeline.from_pretrained("org/name"): the snapshot in the local Hugging Face cache, no
    network; a clear one-line error when it is not cached."""
    import shutil

    from huggingface_hub import constants

    from resampling_forcing.pipeline import Pipeline, PipelineError

    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny-rf" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in TINY.iterdir():
        shutil.copy(f, snap / f.name)
    (cache / "models--someone--tiny-rf" / "refs").mkdir()
    (cache / "models--someone--tiny-rf" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = Pipeline.from_pretrained("someone/tiny-rf")
    assert Path(pipe.source["model_dir"]) == snap
    assert pipe("a red circle bouncing", num_frames=2, num_inference_steps=1).frames.shape[1] == 2
    with pytest.raises(PipelineError, match="not in the local Hugging Face cache") as e:
        Pipeline.from_pretrained("someone/missing-model")
    assert "\n" not in str(e.value)
    with pytest.raises(PipelineError, match="does not exist"):
        Pipeline.from_pretrained("./no/such/dir")


def test_pipeline_call_with_init_video(pipe):
    """pipe(..., init_video=frames): the video is trimmed/encoded first; num_frames counts its frames too."""
    cf = pipe.chunk_frames
    frames = np.stack([_image(32, 32, seed=i) for i in range(2 * cf + 1)])  # 2 chunks (+1 dropped)
    out = pipe(RED, num_frames=pipe.frames_for_chunks(4), num_inference_steps=1, init_video=frames)
    assert out.result.history_chunks == 2 and out.frames.shape[1] == pipe.frames_for_chunks(4)
    assert out.result.init_video["frames_dropped_from_start"] == 1
    ref = pipe.generate(RED, 2, steps=1, seed=out.seed, init_video=frames)
    assert torch.equal(ref.video, out.frames)


def test_init_image_wan_vae_first_latent_is_the_causal_image_frame(tmp_path):
    """With the causal Wan VAE the image is repeated to 1 + 4 (cf - 1) frames; the first latent frame
    is the encoding of the image alone (the VAE's causal first frame)."""
    from diffusers import AutoencoderKLWan

    from resampling_forcing.encoders import HashTextEncoder, WanVAE
    from resampling_forcing.pipeline import Pipeline
    from helpers import tiny_run_config

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                     latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval().save_pretrained(tmp_path / "vae")
    vae = WanVAE(tmp_path)
    cfg = tiny_run_config(data=dict(height=16, width=16))
    model = tiny_model(chunk_frames=3)
    p = Pipeline(model, vae, HashTextEncoder(text_len=6, dim=8), cfg, torch.device("cpu"), torch.float32)
    img = _image(24, 20)
    lat, info = p.load_init_image(img)
    assert lat.shape == (1, 4, 3, 2, 2) and info["frames_repeated"] == 1 + 4 * 2
    x = torch.from_numpy(img).permute(2, 0, 1).float()[:, None] / 127.5 - 1
    from resampling_forcing.data.video import resize_center_crop

    alone = vae.encode(resize_center_crop(x, 16, 16)[None]).float()  # one frame -> one latent frame
    assert alone.shape[2] == 1
    torch.testing.assert_close(lat[:, :, :1], alone, rtol=1e-4, atol=1e-5)
