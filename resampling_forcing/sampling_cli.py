"""Sample videos from a run, a checkpoint or a raw Wan2.1 checkpoint into mp4 files.

    python sample/sample.py --checkpoint runs/tiny --prompt "a red circle moves left" \\
        --num-chunks 8 --output outputs/red.mp4
    python sample/sample.py --checkpoint runs/tiny --prompts-file prompts.txt --batch 4 \\
        --num-chunks 8 --top-k 5 --sink 1 --output outputs/grid/        # one mp4 per prompt
    python sample/sample.py --checkpoint runs/tiny --num-chunks 12 --output outputs/switch.mp4 \\
        --prompts-at "0:a red circle bouncing;6:a blue circle bouncing"    # prompt switch at chunk 6
    python sample/sample.py --checkpoint runs/tiny --prompt "a red circle bouncing" --init-image first.png \\
        --num-chunks 8 --kv-resident-chunks 4 --output outputs/i2v.mp4     # image start, bounded cache
    python sample/sample.py ... --resume      # after any stop: the same command continues it exactly

Each video gets a JSON next to it (same name, .json) with the prompt, the seed, the settings and
the timings. Bad input (missing or mismatched checkpoint, --top-k 0, --num-chunks 0, an
unwritable output, an empty prompts file, an unreadable --init-video or --init-image, a malformed
--prompts-at / --storyboard, ...) prints ONE line on stderr and exits with code 2, before any long
work and without leaving a partial mp4. The chunks of a video in progress are kept in OUT.resume
(sampling_resume.py) until it is written: --resume continues a stopped run from them.
The command line of sample/sample.py (that script only calls `main`): its flags, the checks of every
flag before any file is read, and the run, over resampling_forcing.pipeline.Pipeline (the same API the
notebook uses).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

# torch-free imports only here: --help and the flag checks run before torch is imported
from .attention.spec import BACKENDS, ROUTING_MODES
from .cli import BadInput, OneLineParser, check_seed, run_cli
from .dtypes import DTYPE_BYTES, DTYPE_NAMES, host_tier_problem
from .signals import GracefulStop
from .storyboard import SWITCH_CACHE_MODES


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="sample.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir (latest checkpoint), checkpoints/step_* dir, or a Wan2.1 checkpoint")
    p.add_argument("--config", default=None, help="YAML merged over the checkpoint's config (needed for raw Wan checkpoints)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set data.height=480 (repeatable)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="text file, one prompt per line (blank lines and # comments skipped)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt for CFG (default: config diffusion.negative_prompt)")
    p.add_argument("--num-chunks", type=int, required=True, help="chunks to generate (after --init-video's history)")
    p.add_argument("--output", required=True, help="out.mp4 (several prompts: out_000_<prompt>.mp4, ...), or a directory (no suffix / trailing /): DIR/000_<prompt>.mp4")
    p.add_argument("--steps", type=int, default=None, help="Euler steps per chunk (config: diffusion.sample_steps, paper 32)")
    p.add_argument("--shift", type=float, default=None, help="timestep shift (config: diffusion.sample_shift, paper 5.0)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale; 1 switches the unconditional branch off (paper 5.0)")
    p.add_argument("--context-t", type=float, default=None, help="timestep of the cache-writing pass (default 0)")
    p.add_argument("--routing", choices=ROUTING_MODES, default=None,
                   help="history routing mode (default: --top-k -> topk, --window/--sink -> window, else config)")
    p.add_argument("--top-k", type=int, default=None, help="attend the top-k history chunks per query token")
    p.add_argument("--sink", type=int, default=None, help="always keep the first N history chunks")
    p.add_argument("--window", type=int, default=None, help="always keep the last N history chunks (alone: sliding window)")
    p.add_argument("--record-selection", action="store_true",
                   help="save the routing selection frequencies [chunks, layers, heads, history] as .npy next to the video")
    p.add_argument("--seed", type=int, default=0, help="base seed; prompt i uses seed (seed, i) whatever the batch")
    p.add_argument("--fps", type=float, default=None, help="mp4 frame rate (default: config data.fps)")
    p.add_argument("--batch", type=int, default=1, help="prompts per rollout (batch size)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES, help="model dtype (VAE decodes in fp32)")
    p.add_argument("--attention-backend", default=None, choices=BACKENDS,
                   help="attention backend (default: config attention.backend)")
    p.add_argument("--init-video", default=None, help="continue this video: its frames (resampled to the model's "
                   "fps) become the cached history")
    p.add_argument("--init-image", default=None, help="start from this still image: encoded through the VAE as the "
                   "first chunk's history (repeated to fill the chunk; resized/cropped like --init-video)")
    p.add_argument("--prompts-at", default=None, metavar="'0:PROMPT;8:PROMPT'",
                   help="prompt switching (one video): the prompt of each segment, keyed by the generated chunk "
                   "index where it starts (0 = first generated chunk); replaces --prompt")
    p.add_argument("--storyboard", default=None, metavar="FILE",
                   help="like --prompts-at, from a JSON/YAML file: a list of {chunk, prompt} or a {chunk: prompt} mapping")
    p.add_argument("--switch-cache", choices=SWITCH_CACHE_MODES, default=SWITCH_CACHE_MODES[0],
                   help="at a prompt switch: keep the cached history K/V as written (default) or re-encode the "
                   "history under the new text (LongLive's KV re-cache)")
    p.add_argument("--kv-resident-chunks", type=int, default=None, metavar="N",
                   help="bounded memory: keep at most N finished chunks' K/V on the device, older ones in host "
                   "memory (pinned on CUDA); with --window, chunks outside sink + window are dropped (flat "
                   "memory however long); same output bit for bit (default: all on the device)")
    p.add_argument("--kv-host-dtype", choices=DTYPE_NAMES, default=None,
                   help="with --kv-resident-chunks: dtype of the host tier (smaller than --dtype halves its memory "
                   "but is no longer exact; default: the model's)")
    p.add_argument("--rope-horizon", default=None, metavar="N|train",
                   help="read history more than N chunks back as if N (or --rope-far-at D) chunks back; 'train' = "
                   "the checkpoint's training clip in chunks - 1. Which distance helps is model-specific (README "
                   "'Far-history positions'); default: the config's attention.rope_horizon (null = absolute)")
    p.add_argument("--rope-far-at", type=int, default=None, metavar="D",
                   help="with --rope-horizon: read the far chunks D chunks back instead of at the horizon")
    p.add_argument("--max-history-chunks", type=int, default=16,
                   help="keep at most the last N chunks of --init-video as history (default 16; bounds memory)")
    p.add_argument("--no-ema", action="store_true", help="load model.safetensors even when ema.safetensors exists "
                   "(and a --lora file's adapters, not their EMA; of a LoRA checkpoint keeping only adapters, the adapters)")
    p.add_argument("--lora", action="append", default=None, metavar="PATH",
                   help="merge a LoRA into the --checkpoint weights (repeatable, in order): a LoRA run's lora.safetensors "
                   "or the run / checkpoint folder holding it (a LoRA run's own checkpoint needs no --lora: its weights "
                   "are merged), or another tool's Wan2.1 LoRA .safetensors (Wan, diffusers or kohya/musubi names)")
    p.add_argument("--lora-scale", action="append", type=float, default=None, metavar="S",
                   help="strength of the --lora files: one for all or one per --lora (default 1)")
    p.add_argument("--resume", action="store_true",
                   help="continue the videos a stopped run of this command left (their OUT.resume folders: the chunks "
                   "made so far are kept, bit for bit) and skip those it finished; a larger --num-chunks extends them")
    p.add_argument("--keep-chunks", action="store_true",
                   help="keep each video's OUT.resume folder after it is written, so that a later --resume with a "
                   "larger --num-chunks extends it exactly")
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes (the final 'wrote ...' lines stay)")
    return p


# ----------------------------------------------------------------------------- checks


def read_storyboard(args):
    """--prompts-at / --storyboard -> sorted [(chunk, prompt)] (None without them)."""
    from .storyboard import PipelineError, check_switch_cache, parse_storyboard

    try:
        check_switch_cache(args.switch_cache, args.prompts_at is not None or args.storyboard is not None,
                           "--switch-cache")
    except PipelineError as e:
        raise BadInput(f"{e}".replace("pass a storyboard", "give --prompts-at or --storyboard")) from None

    given = [f for f, v in (("--prompts-at", args.prompts_at), ("--storyboard", args.storyboard)) if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise BadInput("give --prompts-at or --storyboard, not both")
    if args.prompt or args.prompts_file is not None:
        raise BadInput(f"{given[0]} gives the prompts (one video); drop --prompt / --prompts-file")
    spec = args.prompts_at if args.prompts_at is not None else Path(args.storyboard)
    try:
        board = parse_storyboard(spec)
    except PipelineError as e:
        raise BadInput(f"{given[0]}: {e}") from None
    if board[0][0] != 0:
        raise BadInput(f"{given[0]}: needs an entry at chunk 0 (the first prompt)")
    if any(not isinstance(p, str) for _, p in board):
        raise BadInput(f"{given[0]}: one prompt per entry (a string)")
    if board[-1][0] >= args.num_chunks:
        raise BadInput(f"{given[0]}: switches at chunk {board[-1][0]} but --num-chunks is {args.num_chunks} "
                       f"(indices count generated chunks from 0)")
    return board


def read_prompts(args) -> list[str]:
    prompts = [p for p in args.prompt]
    if any(not p.strip() for p in prompts):
        raise BadInput("--prompt must not be empty")
    if args.prompts_file is not None:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise BadInput(f"--prompts-file {path}: no such file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"--prompts-file {path}: cannot read it ({type(e).__name__})") from None
        from_file = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not from_file:
            raise BadInput(f"--prompts-file {path} has no prompts (one per line; blank lines and # comments are skipped)")
        prompts += from_file
    if not prompts:
        raise BadInput("give --prompt TEXT or --prompts-file FILE")
    return prompts


def output_paths(output: str, prompts: list[str]) -> list[Path]:
    """out.mp4 for one prompt; out_000_<slug>.mp4 ... for several; DIR/000_<slug>.mp4 for a directory
    (an existing one, or a path ending with / or without a suffix): storyboard.video_paths."""
    from .storyboard import PipelineError, video_paths

    try:
        return video_paths(output, prompts)
    except PipelineError as e:
        raise BadInput(f"--{e}") from None


def check_writable(paths: list[Path]) -> None:
    """Fail now (not after the rollout) when an output cannot be written: really creates a temporary
    file (or folder) where the outputs go, and removes it again."""
    from .io import probe_writable_dir

    for folder in sorted({p.parent for p in paths}):
        problem = probe_writable_dir(folder)
        if problem:
            raise BadInput(f"--output: {problem}")
    for p in paths:
        for q in (p, p.with_suffix(".json")):
            if q.is_dir():
                raise BadInput(f"--output: {q} is a directory")
            if q.exists() and not os.access(q, os.W_OK):
                raise BadInput(f"--output: {q} exists and is not writable")


def process_share(args, num_prompts: int) -> tuple[list[int], int, int]:
    """Under a launcher (torchrun, accelerate launch: RANK and WORLD_SIZE set) process r samples prompts r,
    r + W, r + 2W, ... on cuda:LOCAL_RANK: the files, seeds and videos are those of one process sampling
    them all. -> (this process's prompt indices, rank, world size)."""
    env = {}
    for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        value = os.environ.get(name, default)
        if not value.isdigit():
            raise BadInput(f"environment variable {name}={value!r}: a launcher sets it to an int >= 0")
        env[name] = int(value)
    rank, world = env["RANK"], env["WORLD_SIZE"]
    if world < 1 or rank >= world:
        raise BadInput(f"environment: RANK={rank} with WORLD_SIZE={world}; a launcher sets 0 <= RANK < WORLD_SIZE")
    if world > 1 and args.device not in ("auto", "cuda", "cpu"):
        raise BadInput(f"--device {args.device} with {world} processes would put every one on the same device; "
                       "give --device cuda (process r takes cuda:LOCAL_RANK) or cpu")
    return list(range(rank, num_prompts, world)), rank, world


def check_leftovers(paths: list[Path], resume: bool) -> None:
    """A stopped run's resume folder is continued with --resume, never overwritten without it."""
    from .sampling_resume import ResumeState

    for p in paths:
        st = ResumeState(p)
        if st.dir.exists() and not st.dir.is_dir():
            raise BadInput(f"--output: {st.dir} is a file, and sample.py keeps the chunks of {p.name} in progress there")
        if st.exists() and not resume:
            raise BadInput(f"{st.dir}: a run left {st.chunks()} chunk(s) of {p.name} there (stopped, or --keep-chunks); "
                           "add --resume to continue or extend it, or remove the folder to start that video over")


def check_args(args) -> None:
    """What only the CLI knows (counts, files, flag combinations); the sampling values are checked by
    SamplingOptions.from_config (sampling_options)."""
    if args.num_chunks < 1:
        raise BadInput(f"--num-chunks must be >= 1 (got {args.num_chunks})")
    from .io import fps_problem  # numpy only (write_mp4's rule)

    if args.fps is not None and fps_problem(args.fps):
        raise BadInput(f"--fps {fps_problem(args.fps)}")
    problem = host_tier_problem(args.kv_host_dtype, args.dtype)
    if problem:
        raise BadInput(f"--kv-host-dtype {problem}")
    if not args.output.strip():
        raise BadInput("--output must not be empty (a .mp4 file or a folder)")
    if not args.checkpoint.strip():
        raise BadInput("--checkpoint must not be empty (a run dir, a checkpoints/step_* dir or a Wan2.1 checkpoint)")
    if args.batch < 1:
        raise BadInput(f"--batch must be >= 1 (got {args.batch})")
    check_seed("--seed", args.seed)
    if args.max_history_chunks < 1:
        raise BadInput(f"--max-history-chunks must be >= 1 (got {args.max_history_chunks})")
    if args.init_video is not None and args.init_image is not None:
        raise BadInput("give --init-video or --init-image, not both")
    for flag, value in (("--init-video", args.init_video), ("--init-image", args.init_image),
                        ("--storyboard", args.storyboard), ("--prompts-file", args.prompts_file)):
        if value is not None and not Path(value).is_file():
            raise BadInput(f"{flag} {value}: {'is a directory, not a file' if Path(value).is_dir() else 'no such file'}")
    from .lora_formats import check_file, lora_list
    from .models.loading import CheckpointError

    try:
        loras = lora_list(args.lora, args.lora_scale)
    except ValueError as e:
        raise BadInput(f"--lora / --lora-scale: {e}") from None
    for path, _ in loras:  # the headers, before anything loads
        try:
            check_file(path)
        except CheckpointError as e:
            raise BadInput(f"--lora {e}") from None


# SamplingOptions.from_config's names -> the flags that set them (its errors are reworded with these).
_FLAGS = {"attention.routing.top_k": "--top-k", "attention.routing.sink_chunks": "--sink",
          "attention.routing.window_chunks": "--window", "steps": "--steps", "shift": "--shift",
          "cfg_scale": "--cfg", "context_t": "--context-t", "kv_resident_chunks": "--kv-resident-chunks",
          "kv_host_dtype": "--kv-host-dtype", "rope_horizon": "--rope-horizon",
          "rope_far_at": "--rope-far-at"}
_ROUTING_WORDS = (("routing='dense' contradicts", "--routing dense contradicts"),
                  ("routing='window' contradicts", "--routing window contradicts"),
                  ("contradicts top_k=", "contradicts --top-k "), ("contradicts sink=", "contradicts --sink "),
                  ("contradicts window=", "contradicts --window "),
                  ("mode='dense'", "--routing dense"), ("mode='window'", "--routing window"),
                  ("mode='topk'", "--routing topk"), ("(or sink_chunks)", "(or --sink)"),
                  ("set window_chunks", "set --window"), ("set top_k", "set --top-k"))
# a name at the start of the message, or after "needs"
_FLAG_RE = re.compile(r"(?:^|(?<=needs ))(" + "|".join(re.escape(k) for k in sorted(_FLAGS, key=len, reverse=True))
                      + r")(?![\w])")


def _horizon_arg(value: str | None):
    """--rope-horizon: 'train' as is (SamplingOptions resolves it), a number as an int; anything else
    passes through for the options' own one-line error."""
    if value is None or value == "train":
        return value
    try:
        return int(value)
    except ValueError:
        return value


def sampling_options(cfg, device, args):
    """The flags -> SamplingOptions over `cfg` (SamplingOptions.from_config: the one build and
    validation of the options); a bad value -> BadInput naming the flag."""
    from .options import SamplingOptions

    try:
        return SamplingOptions.from_config(
            cfg, device, routing=args.routing, top_k=args.top_k, sink=args.sink, window=args.window,
            steps=args.steps, shift=args.shift, cfg_scale=args.cfg, context_t=args.context_t,
            record_selection=True if args.record_selection else None,
            kv_resident_chunks=args.kv_resident_chunks, kv_host_dtype=args.kv_host_dtype,
            rope_horizon=_horizon_arg(args.rope_horizon), rope_far_at=args.rope_far_at)
    except (ValueError, TypeError) as e:
        msg = _FLAG_RE.sub(lambda m: _FLAGS[m.group(1)], str(e).strip().splitlines()[0])
        for name, flag in _ROUTING_WORDS:  # the routing rules speak config (RoutingSpec); say the flags
            msg = msg.replace(name, flag)
        raise BadInput(msg) from None


# ----------------------------------------------------------------------------- main


def run(args) -> int:
    check_args(args)
    storyboard = read_storyboard(args)
    prompts = [storyboard[0][1]] if storyboard is not None else read_prompts(args)
    paths = output_paths(args.output, prompts)
    mine, rank, world = process_share(args, len(prompts))
    if not mine:
        if not args.quiet:
            print(f"process {rank} of {world}: no prompt falls to it ({len(prompts)} in all)", file=sys.stderr)
        return 0
    check_writable([paths[i] for i in mine])
    check_leftovers([paths[i] for i in mine], args.resume)

    from .config import Config, ConfigError
    from .encoders import EncoderLoadError
    from .io import clean_stale_temps
    from .models.loading import CheckpointError
    from .pipeline import Pipeline, PipelineError, read_image, resolve_config, resolve_device
    from .pipeline.loading import check_model_overrides

    early = Config()
    if args.rope_far_at is not None and args.rope_horizon is None:
        early.attention.rope_horizon = 1  # the checkpoint's config may set the horizon: checked once it is read
    sampling_options(early, "cpu", args)  # the flags' own values, before any file is read
    input_errors = (PipelineError, CheckpointError, ConfigError, EncoderLoadError)
    t_load = time.perf_counter()
    try:
        if args.init_image is not None:
            try:
                read_image(args.init_image, what="--init-image")  # bad files fail before anything is loaded
            except PipelineError as e:
                raise BadInput(str(e)) from None
        overrides = list(args.overrides) + ([f"attention.backend={args.attention_backend}"]
                                            if args.attention_backend is not None else [])
        device = resolve_device(_process_device(args.device), what="--device")
        cfg = resolve_config(args.checkpoint, config=args.config, overrides=overrides, use_ema=not args.no_ema)
        try:
            check_model_overrides(cfg, args.overrides)
        except PipelineError as e:
            raise BadInput(f"--set {e}") from None
        opts = sampling_options(cfg, device, args)  # the options of every rollout below
        if opts.record_selection and (opts.routing is None or opts.routing.is_dense):
            raise BadInput("--record-selection records routing picks, and this rollout attends densely (no routing "
                           "in the checkpoint's config): add --routing topk --top-k K or --routing window")
        check_memory(cfg, device, args, len(mine), opts)
        pipe = Pipeline.from_pretrained(args.checkpoint, config=args.config, overrides=args.overrides,
                                        device=device, dtype=args.dtype, use_ema=not args.no_ema,
                                        attention_backend=args.attention_backend, lora=args.lora,
                                        lora_scale=args.lora_scale)
        history, init_info = (None, None)
        if args.init_video is not None:
            history, init_info = pipe.load_init_video(args.init_video, max_chunks=args.max_history_chunks)
        elif args.init_image is not None:
            history, init_info = pipe.load_init_image(args.init_image)
    except input_errors as e:
        raise BadInput(str(e).strip().splitlines()[0]) from None
    load_s = time.perf_counter() - t_load
    fps = args.fps if args.fps is not None else pipe.config.data.fps
    neg = args.negative_prompt if args.negative_prompt is not None else pipe.config.diffusion.negative_prompt
    if init_info is not None and args.init_video is not None and not args.quiet:
        print(f"init video: {init_info['frames_in']} frames at {init_info['fps'] or 0:g} fps -> kept the last "
              f"{init_info['frames_used']} ({init_info['chunks']} chunks, at most --max-history-chunks "
              f"{args.max_history_chunks}), dropped {init_info['frames_dropped_from_start']} from the start",
              file=sys.stderr)
    for path in (paths[i] for i in mine):  # temporaries of a killed run's writing of these outputs (only this
        for stale in (path, path.with_suffix(".selection.npy")):  # process's: the others' are being written)
            clean_stale_temps(stale)

    switches = [e for e in storyboard if e[0] > 0] or None if storyboard is not None else None
    with GracefulStop("finishing the chunk in progress, then writing the video so far",
                      "stopped without writing the video in progress (--resume continues it)") as stop:
        return _generate_and_write(args, pipe, prompts, paths, mine, neg, fps, opts, history, init_info, storyboard,
                                   switches, load_s, stop)


def _generate_and_write(args, pipe, prompts, paths, mine, neg, fps, opts, history, init_info, storyboard, switches,
                        load_s, stop) -> int:
    """Generate the prompts in batches and write each video; after a stop signal the batch in progress ends
    with its current chunk and is written (marked "stopped_early"), later batches are not started."""
    import torch

    from .io import OutputError, is_no_space
    from .lora import fingerprint
    from .pipeline import VideoFiles
    from .sampling_resume import ResumeError, ResumeState, batch_replay, finished, init_source, run_key

    weights = fingerprint(pipe.model.state_dict())
    init = init_source(args.init_video, args.init_image, args.max_history_chunks, pipe.config.data.fps)
    for start in range(0, len(mine), args.batch):
        idx = mine[start:start + args.batch]
        if stop.requested:
            print(f"not generated ({stop.requested}): {', '.join(str(paths[i]) for i in mine[start:])}", file=sys.stderr)
            break
        keys = [run_key(weights=weights, pipeline=pipe.describe(), options=opts.to_dict(), prompt=prompts[i],
                        negative_prompt=neg if opts.cfg_scale != 1.0 else None, seed=args.seed, index=i,
                        batch_indices=idx, storyboard=[list(e) for e in storyboard] if storyboard else None,
                        switch_cache=args.switch_cache if storyboard else None, init=init) for i in idx]
        states = [ResumeState(paths[i]) for i in idx]
        if args.resume and all(finished(paths[i], k, args.num_chunks) for i, k in zip(idx, keys)):
            for i in idx:
                print(f"kept {paths[i]} (finished by an earlier run of this command)", file=sys.stderr)
            continue
        replay = None
        if args.resume:
            cfg = pipe.model.cfg
            try:
                replay = batch_replay(states, keys, args.num_chunks, (cfg.in_channels, cfg.chunk_frames, *pipe.latent_hw),
                                      note=lambda msg: print(f"note: {msg}", file=sys.stderr))
            except ResumeError as e:
                raise BadInput(str(e)) from None
            if replay is not None and not args.quiet:
                print(f"resuming {', '.join(str(paths[i]) for i in idx)}: {replay.shape[2] // cfg.chunk_frames} of "
                      f"{args.num_chunks} chunks kept", file=sys.stderr)
        # every video streams into its mp4 while the rollout runs (host memory flat in its length); each is
        # committed with its JSON after the rollout, or removed on an error
        files = []
        try:
            for i in idx:
                files.append(VideoFiles(paths[i], fps, with_selection=opts.record_selection))
            for st, key in zip(states, keys):
                st.begin(key)

            def sink(piece):
                for b, f in enumerate(files):
                    f.write(piece[b])

            def on_chunk(chunk):  # each new chunk is kept at once: a kill loses at most the chunk in progress
                if not chunk.replayed:
                    for b, st in enumerate(states):
                        st.save(chunk.generated, chunk.latents[b])
                return stop.requested is None

            res = pipe.generate([prompts[i] for i in idx], args.num_chunks, negative_prompt=neg, seed=args.seed,
                                indices=idx, options=opts, init_latents=history, progress=not args.quiet,
                                storyboard=switches, switch_cache=args.switch_cache,
                                callback=on_chunk, video_sink=sink, keep_latents=False, replay=replay)
            _commit_batch(args, pipe, res, idx, files, prompts, paths, fps, init_info, storyboard, load_s, stop,
                          states, keys)
        except (OutputError, BrokenPipeError) as e:
            if stop.requested is not None:
                # a signal to the whole job (Slurm, systemd) reaches the encoders too: they end their files early
                print(f"stopped by {stop.requested}, which also stopped the video encoder (a signal to the whole "
                      f"job): the videos in progress are not written (--resume continues them); signal sample.py alone to "
                      "keep them",
                      file=sys.stderr)
                return stop.exit_code()
            if isinstance(e, BrokenPipeError):
                raise
            print(f"error: {e} (--resume continues the videos in progress)", file=sys.stderr)  # one line, exit 1
            return 1
        except OSError as e:
            if is_no_space(e):
                where = Path(e.filename) if e.filename else paths[idx[0]]
                raise BadInput(f"no space left on {where.parent} (writing {where.name}); free some space, then "
                               "--resume continues the videos in progress") from None
            raise
        finally:
            _abort_all(files)  # a no-op for the committed ones
        if pipe.device.type == "cuda":
            torch.cuda.empty_cache()
    return stop.exit_code() if stop.requested else 0


def _process_device(device: str) -> str:
    """Under a launcher with several processes, --device auto / cuda is this process's GPU (cuda:LOCAL_RANK)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device in ("auto", "cuda"):
        import torch

        if device == "cuda" or torch.cuda.is_available():
            return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def _abort_all(files) -> None:
    """Abort every file (kill its encoder, remove its temporaries), also when one abort is interrupted."""
    pending = None
    for f in files:
        try:
            f.abort()
        except BaseException as e:  # noqa: BLE001 - a second signal: the other files still go
            pending = pending or e
    if pending is not None:
        raise pending


def _commit_batch(args, pipe, res, idx, files, prompts, paths, fps, init_info, storyboard, load_s, stop,
                  states, keys) -> None:
    """Write the JSON (and selections) of each streamed video of a batch and commit its files, in order; a
    whole video's resume folder goes, a stopped one's stays for --resume."""
    from .pipeline import PipelineOutput

    done = res.timings["generated_chunks"]
    out = PipelineOutput(frames=None, result=res, fps=fps, seed=args.seed, indices=idx, pipeline=pipe.describe())
    if storyboard is not None and res.storyboard is None:  # a one-entry storyboard: still recorded
        res.storyboard, res.switch_cache = [dict(chunk=0, prompt=prompts[0])], args.switch_cache
    stopped = None
    if done < args.num_chunks:
        stopped = dict(signal=stop.requested, requested_chunks=args.num_chunks)
        if res.storyboard:  # the JSON lists the switches the video shows; the others, here
            stopped["switches_not_reached"] = [e["chunk"] for e in res.storyboard if e["chunk"] >= done]
            res.storyboard = [e for e in res.storyboard if e["chunk"] < done]
    for b, i in enumerate(idx):
        path = paths[i]
        init = None
        if init_info is not None:
            init = dict(init_info, source=str(args.init_video if args.init_video is not None else args.init_image))
            if args.init_video is not None:
                init["max_history_chunks"] = args.max_history_chunks
        meta = out.metadata(b, path)
        meta.update(num_chunks=done, init_video=init if args.init_video is not None else None,
                    timings=dict(res.timings, load_s=load_s, batch_prompts=len(idx)), argv=sys.argv[1:],
                    resume_key=keys[b])
        if stopped is not None:
            meta["stopped_early"] = stopped
        if args.init_image is not None:
            meta["init_image"] = init
        files[b].commit(meta, None if res.selection is None else res.selection[b])  # this sample's picks
        t = res.timings
        part = "" if stopped is None else f", stopped by {stop.requested} after {done} of {args.num_chunks} chunks"
        if t["replayed_chunks"]:
            part += f", {t['replayed_chunks']} kept from the stopped run"
        if t["first_chunk_latency_s"] is not None:
            part += f", first chunk {t['first_chunk_latency_s']:.2f}s, {t['fps_with_decode'] or 0:.2f} fps with decode"
        print(f"wrote {path} ({meta['frames']} frames{part})" + ("; --resume continues it" if stopped else ""),
              file=sys.stderr)
    if stopped is None and not args.keep_chunks:  # the batch is replayed whole: its folders go when every video
        # of it is committed
        for st in states:
            if st.chunks() <= done:  # (one asked for fewer chunks than a stopped run had made keeps them)
                st.remove()


def check_memory(cfg, device, args, num_prompts: int, opts) -> None:
    """Refuse, before loading anything, a rollout whose memory lower bound exceeds what is free; note
    the estimate when a CPU rollout will take long. `opts`: the SamplingOptions of the rollouts."""
    from .memory import check_fits, gib, rollout_need, sample_flops

    d = cfg.data
    batch = min(args.batch, num_prompts)
    history = args.max_history_chunks if args.init_video is not None else (1 if args.init_image is not None else 0)
    need = rollout_need(cfg, opts, args.num_chunks, batch, DTYPE_BYTES[args.dtype], history, streamed=True)
    what = f"sampling {args.num_chunks} chunks at {d.height}x{d.width} (batch {batch})"
    fix = "lower --num-chunks / --batch" + (" / --max-history-chunks (counted in full here)" if args.init_video else "")
    if opts.kv_resident_chunks is None:
        fix += ", bound the KV cache (--kv-resident-chunks N)"
    msg = check_fits(need, device, what, f"{fix} or the resolution (--set data.height=...)")
    if msg:
        raise BadInput(msg)
    flops = sample_flops(cfg, args.num_chunks, batch, opts.steps, opts.cfg_scale, history)
    if device.type == "cpu" and flops > 2e13 and not args.quiet:
        print(f"note: {what} is about {flops / 1e12:.0f} TFLOP and needs at least "
              f"{gib(need['device'] + need['host'])}: on a CPU (~0.1-1 TFLOP/s) this takes "
              f"{flops / 1e12 / 60:.0f}+ minutes", file=sys.stderr)


def main(argv=None) -> int:
    return run_cli(build_parser, run, argv)
