"""Sample videos from a run, a checkpoint or a raw Wan checkpoint (Wan2.1 T2V, Wan2.2-TI2V-5B) into mp4 files.

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
The command line of sample/sample.py (that script only calls `main`): its flags and the checks of every
flag before any file is read; the run itself, over resampling_forcing.pipeline.Pipeline (the same API the
notebook uses), is sampling_run.py.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

# torch-free imports only here: --help and the flag checks run before torch is imported
from .attention.spec import BACKENDS, ROUTING_MODES
from .cli import BadInput, OneLineParser, doc_summary, check_seed, run_cli
from .dtypes import DTYPE_BYTES, DTYPE_NAMES, host_tier_problem
from .memory import MAX_HISTORY_CHUNKS
from .storyboard import SWITCH_CACHE_MODES


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="sample.py", description=doc_summary(__doc__),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir (latest checkpoint), checkpoints/step_* dir, or a Wan checkpoint (Wan2.1 T2V, Wan2.2-TI2V-5B)")
    p.add_argument("--config", default=None, help="YAML merged over the checkpoint's config (needed for raw Wan checkpoints)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set data.height=480 (repeatable)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="text file, one prompt per line (blank lines and # comments skipped)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt for CFG (default: config diffusion.negative_prompt)")
    p.add_argument("--num-chunks", type=int, default=None, help="chunks to generate (after --init-video's history)")
    p.add_argument("--seconds", type=float, default=None, help="instead of --num-chunks: generate at least this "
                   "long a video (after the history) at --fps (default the config's data.fps), rounded up to whole "
                   "chunks")
    p.add_argument("--output", required=True, help="out.mp4 (several prompts: out_000_<prompt>.mp4, ...), or a directory (no suffix / trailing /): DIR/000_<prompt>.mp4")
    p.add_argument("--steps", type=int, default=None, help="Euler steps per chunk (config: diffusion.sample_steps, paper 32)")
    p.add_argument("--shift", type=float, default=None, help="timestep shift (config: diffusion.sample_shift, paper 5.0)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale; 1 switches the unconditional branch off (paper 5.0)")
    p.add_argument("--context-t", type=float, default=None, help="timestep of the cache-writing pass (default 0)")
    p.add_argument("--routing", choices=ROUTING_MODES, default=None,
                   help="history routing mode (default: --top-k -> topk; --window/--sink -> window on a dense config, "
                        "added to top-k on a top-k one; else config)")
    p.add_argument("--top-k", type=int, default=None, help="attend the top-k history chunks per query token")
    p.add_argument("--sink", type=int, default=None, help="always keep the first N history chunks")
    p.add_argument("--window", type=int, default=None, help="always keep the last N history chunks (alone on a dense config: the sliding-window "
                        "baseline)")
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
    p.add_argument("--max-history-chunks", type=int, default=MAX_HISTORY_CHUNKS,
                   help=f"keep at most the last N chunks of --init-video as history (default {MAX_HISTORY_CHUNKS}; "
                   "bounds memory)")
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output videos (without it an existing one is refused, except with --resume "
                   "the one this command wrote)")
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
    check_storyboard_fits(board, args)
    return board


def check_storyboard_fits(board, args) -> None:
    """Every switch of a storyboard falls inside the rollout (rechecked once --seconds is made chunks)."""
    if board is not None and args.num_chunks is not None and board[-1][0] >= args.num_chunks:
        flag = "--prompts-at" if args.prompts_at is not None else "--storyboard"
        given = f"--num-chunks is {args.num_chunks}" if args.seconds is None else \
            f"--seconds {args.seconds:g} makes {args.num_chunks} chunks"
        raise BadInput(f"{flag}: switches at chunk {board[-1][0]} but {given} (indices count generated chunks from 0)")


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


def check_existing(paths: list[Path], args) -> None:
    """An existing video of `paths` (this process's outputs) is replaced only with --overwrite; --resume
    continues or keeps the ones this command wrote (checked against their run keys once the model is loaded:
    sampling_run). The input video is never an output."""
    if args.init_video is not None:
        src = Path(args.init_video).resolve()
        for p in paths:
            if p.resolve() == src:
                raise BadInput(f"--output {p} is the --init-video itself: writing it would destroy the input; "
                               "choose another --output")
    if args.overwrite or args.resume:
        return
    for p in paths:
        if p.exists():
            raise BadInput(f"--output: {p} exists; add --overwrite to replace it (or --resume to continue the run "
                           "that wrote it), or choose another --output")


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


def launcher_int(name: str, default: str | None) -> int:
    """A launcher's environment variable (WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE) as an int >= 0;
    `default` when it is not set (None: it must be); anything else is one line."""
    value = os.environ.get(name, default)
    if value is None:
        raise BadInput(f"environment: WORLD_SIZE={os.environ.get('WORLD_SIZE')} but {name} is not set; start "
                       "sample.py with torchrun or accelerate launch, which set WORLD_SIZE, RANK and LOCAL_RANK")
    if not re.fullmatch(r"[0-9]+", value):
        raise BadInput(f"environment variable {name}={value!r}: a launcher sets it to an int >= 0")
    return int(value)


def process_share(args, num_prompts: int) -> tuple[list[list[int]], int, int]:
    """Under a launcher (torchrun, accelerate launch: WORLD_SIZE, RANK, LOCAL_RANK set) the batches of one
    process sampling every prompt ([0 .. B-1], [B .. 2B-1], ...) are dealt round-robin: process r takes
    batches r, r + W, ..., on cuda:LOCAL_RANK. So the files, seeds, batches and videos (and the --resume
    keys) do not depend on the number of processes. -> (this process's batches, rank, world size)."""
    world = launcher_int("WORLD_SIZE", "1")
    several = world > 1
    rank, _ = launcher_int("RANK", None if several else "0"), launcher_int("LOCAL_RANK", None if several else "0")
    if world < 1 or rank >= world:
        raise BadInput(f"environment: RANK={rank} with WORLD_SIZE={world}; a launcher sets 0 <= RANK < WORLD_SIZE")
    if several and args.device not in ("auto", "cuda", "cpu"):
        raise BadInput(f"--device {args.device} with {world} processes would put every one on the same device; "
                       "give --device cuda (process r takes cuda:LOCAL_RANK) or cpu")
    batches = [list(range(s, min(s + args.batch, num_prompts))) for s in range(0, num_prompts, args.batch)]
    return batches[rank::world], rank, world


def check_leftovers(paths: list[Path], resume: bool, own: set[Path], overwrite: bool = False) -> None:
    """A stopped run's resume folder is continued with --resume, discarded with --overwrite (start over),
    never overwritten without one of them. Every process of a launcher checks every output (they agree,
    before any loads); each tidies only its `own`."""
    from .sampling_resume import ResumeState

    for p in paths:
        st = ResumeState(p)
        if st.dir.exists() and not st.dir.is_dir():
            raise BadInput(f"--output: {st.dir} is a file, and sample.py keeps the chunks of {p.name} in progress there")
        if st.exists() and (not st.chunks() or (overwrite and not resume)):
            if p in own:
                st.remove()  # made by a run stopped before its first chunk, or discarded by --overwrite
        elif st.exists() and not resume:
            raise BadInput(f"{st.dir}: a run left {st.chunks()} chunk(s) of {p.name} there (stopped, or --keep-chunks); "
                           "add --resume to continue or extend it, or --overwrite to start that video over")


def check_args(args) -> None:
    """What only the CLI knows (counts, files, flag combinations); the sampling values are checked by
    SamplingOptions.from_config (sampling_options)."""
    if (args.num_chunks is None) == (args.seconds is None):
        raise BadInput("give the length: --num-chunks N or --seconds S (one of them)")
    if args.num_chunks is not None and args.num_chunks < 1:
        raise BadInput(f"--num-chunks must be >= 1 (got {args.num_chunks})")
    if args.seconds is not None and not (math.isfinite(args.seconds) and args.seconds > 0):
        raise BadInput(f"--seconds must be a number > 0 (got {args.seconds:g})")
    from .mp4 import fps_problem  # numpy only (write_mp4's rule)

    if args.fps is not None and fps_problem(args.fps):
        raise BadInput(f"--fps {fps_problem(args.fps)}")
    problem = host_tier_problem(args.kv_host_dtype, args.dtype)
    if problem:
        raise BadInput(f"--kv-host-dtype {problem}")
    if not args.output.strip():
        raise BadInput("--output must not be empty (a .mp4 file or a folder)")
    if not args.checkpoint.strip():
        raise BadInput("--checkpoint must not be empty (a run dir, a checkpoints/step_* dir or a Wan2.1 / Wan2.2 checkpoint)")
    if args.batch < 1:
        raise BadInput(f"--batch must be >= 1 (got {args.batch})")
    check_seed("--seed", args.seed)
    if args.max_history_chunks < 1:
        raise BadInput(f"--max-history-chunks must be >= 1 (got {args.max_history_chunks})")
    if args.init_video is not None and args.init_image is not None:
        raise BadInput("give --init-video or --init-image, not both")
    for flag, value in (("--init-video", args.init_video), ("--init-image", args.init_image),
                        ("--storyboard", args.storyboard), ("--prompts-file", args.prompts_file)):
        if value is not None and not value.strip():  # Path("") is the current folder
            raise BadInput(f"{flag} must not be empty (a file path)")
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


def check_memory(cfg, device, args, num_prompts: int, opts) -> None:
    """Refuse, before loading anything, a rollout whose memory lower bound exceeds what is free; note
    the estimate when a CPU rollout will take long. `opts`: the SamplingOptions of the rollouts."""
    from .memory import check_fits, gib, rollout_need, sample_flops

    d = cfg.data
    batch = min(args.batch, num_prompts)
    history = args.max_history_chunks if args.init_video is not None else (1 if args.init_image is not None else 0)
    need = rollout_need(cfg, opts, args.num_chunks, batch, DTYPE_BYTES[args.dtype], history, streamed=True)
    what = f"sampling {args.num_chunks} chunks at {d.height}x{d.width} (batch {batch})"
    local = launcher_int("LOCAL_WORLD_SIZE", "1")
    if local > 1:  # a launcher's processes on this node share its RAM (and, on a CPU, are its device)
        need = dict(need, host=need["host"] * local, device=need["device"] * (local if device.type == "cpu" else 1))
        what += f" in each of {local} processes on this node"
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
    from .sampling_run import run

    return run_cli(build_parser, run, argv)
