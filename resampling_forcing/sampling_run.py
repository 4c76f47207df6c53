"""The run of sample/sample.py once its flags are checked (sampling_cli.py): load the pipeline, then
generate the prompts (this process's share under a launcher) in batches, streaming every video into its
mp4 and keeping each finished chunk for --resume (sampling_resume.py), and commit each video with its JSON.
Torch is imported inside the functions: sample.py --help and the flag checks stay fast."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from .cli import BadInput
from .sampling_resume import ResumeError, lock_videos
from .signals import GracefulStop, stop_at_once
from .memory import chunks_for_seconds, codec_geometry, pixel_frames
from .sampling_cli import (check_args, check_existing, check_leftovers, check_memory, check_storyboard_fits, check_writable,
                           launcher_int, output_paths, process_share, read_prompts, read_storyboard, sampling_options)

__all__ = ["run"]


def run(args) -> int:
    check_args(args)
    storyboard = read_storyboard(args)
    prompts = [storyboard[0][1]] if storyboard is not None else read_prompts(args)
    paths = output_paths(args.output, prompts)
    batches, rank, world = process_share(args, len(prompts))
    mine = [i for idx in batches for i in idx]
    check_writable(paths)  # every process checks every output: they refuse together, before any loads
    with contextlib.ExitStack() as held:  # this process's outputs locked before any resume folder is read
        held.enter_context(stop_at_once("stopped while no video was in progress: nothing half-written"))
        try:
            held.enter_context(lock_videos([paths[i] for i in mine]))
        except ResumeError as e:
            raise BadInput(str(e)) from None
        return _load_and_generate(args, storyboard, prompts, paths, batches, rank, world, mine)


def _load_and_generate(args, storyboard, prompts, paths, batches, rank, world, mine) -> int:
    """Load the pipeline (and a given history), then generate this process's share (its outputs locked)."""
    check_existing([paths[i] for i in mine], args)  # under the locks; its own only: another process may be writing the others
    check_leftovers(paths, args.resume, own={paths[i] for i in mine}, overwrite=args.overwrite)
    if not mine:
        if not args.quiet:
            print(f"process {rank} of {world}: no batch falls to it ({len(prompts)} prompts in all)", file=sys.stderr)
        return 0

    from .config import Config, ConfigError
    from .encoders import EncoderLoadError
    from .io import clean_stale_temps
    from .models.loading import CheckpointError
    from .pipeline import Pipeline, PipelineError, read_image, resolve_config, resolve_device
    from .pipeline.inputs import probe_video
    from .pipeline.loading import check_model_overrides

    early = Config()  # what the checkpoint's config may give (checked once it is read) gets a stand-in here
    if args.rope_far_at is not None and args.rope_horizon is None:
        early.attention.rope_horizon = 1
    if args.routing == "topk" and args.top_k is None:
        early.attention.routing.top_k = 1
    if args.routing == "window" and not (args.window or args.sink):
        early.attention.routing.window_chunks = 1
    sampling_options(early, "cpu", args)  # the flags' own values, before any file is read
    input_errors = (PipelineError, CheckpointError, ConfigError, EncoderLoadError)
    t_load = time.perf_counter()
    try:
        if args.init_image is not None:
            try:
                read_image(args.init_image, what="--init-image")  # bad files fail before anything is loaded
            except PipelineError as e:
                raise BadInput(str(e)) from None
        if args.init_video is not None:
            probe_video(args.init_video, what="--init-video")  # likewise: its header, not its frames
        overrides = list(args.overrides) + ([f"attention.backend={args.attention_backend}"]
                                            if args.attention_backend is not None else [])
        device = resolve_device(_process_device(args.device), what="--device")
        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)  # what launches on the current device (Triton) runs on this process's GPU
        cfg = resolve_config(args.checkpoint, config=args.config, overrides=overrides, use_ema=not args.no_ema)
        try:
            check_model_overrides(cfg, args.overrides)
        except PipelineError as e:
            raise BadInput(f"--set {e}") from None
        opts = sampling_options(cfg, device, args)  # the options of every rollout below
        if opts.record_selection and (opts.routing is None or opts.routing.is_dense):
            raise BadInput("--record-selection records routing picks, and this rollout attends densely (no routing "
                           "in the checkpoint's config): add --routing topk --top-k K or --routing window")
        if args.seconds is not None:  # the length in chunks, from the config's fps and the codec's geometry
            given = args.init_video is not None or args.init_image is not None
            fps = args.fps if args.fps is not None else cfg.data.fps  # seconds of the file written
            if args.seconds * fps > 1e8:
                raise BadInput(f"--seconds {args.seconds:g} at {fps:g} fps is over 10^8 frames; give a length in reach")
            args.num_chunks = chunks_for_seconds(cfg, args.seconds, history=given, fps=fps)
            check_storyboard_fits(storyboard, args)
            if not args.quiet:
                geo, cf = codec_geometry(cfg), cfg.model.chunk_frames
                frames = pixel_frames(geo, (args.num_chunks + given) * cf) - (pixel_frames(geo, cf) if given else 0)
                print(f"--seconds {args.seconds:g}: {args.num_chunks} chunks, {frames} frames ({frames / fps:.2f} s "
                      f"at {fps:g} fps)", file=sys.stderr)
        check_memory(cfg, device, args, len(mine), opts)
        pipe = Pipeline.from_pretrained(args.checkpoint, config=args.config, overrides=args.overrides,
                                        device=device, dtype=args.dtype, use_ema=not args.no_ema,
                                        attention_backend=args.attention_backend, lora=args.lora,
                                        lora_scale=args.lora_scale)
        history, init_info = (None, None)
        if args.init_video is not None:
            history, init_info = pipe.load_init_video(args.init_video, max_chunks=args.max_history_chunks,
                                                      what="--init-video")
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
        return _generate_and_write(args, pipe, prompts, paths, batches, neg, fps, opts, history, init_info, storyboard,
                                   switches, load_s, stop)


def _generate_and_write(args, pipe, prompts, paths, batches, neg, fps, opts, history, init_info, storyboard, switches,
                        load_s, stop) -> int:
    """Generate the prompts in batches and write each video; after a stop signal the batch in progress ends
    with its current chunk and is written (marked "stopped_early"), later batches are not started."""
    import torch

    from .io import OutputError, is_no_space
    from .lora import fingerprint
    from .pipeline import VideoFiles
    from .sampling_resume import ResumeError, ResumeState, batch_replay, finished, init_source, run_key, written_by

    weights = fingerprint(pipe.model.state_dict())
    init = init_source(args.init_video, args.init_image, args.max_history_chunks, pipe.config.data.fps)
    mine = [i for idx in batches for i in idx]
    common = dict(weights=weights, pipeline=pipe.describe(), options=opts.to_dict(),
                  negative_prompt=neg if opts.cfg_scale != 1.0 else None, seed=args.seed,
                  storyboard=[list(e) for e in storyboard] if storyboard else None,
                  switch_cache=args.switch_cache if storyboard else None, init=init)
    keys = {i: run_key(prompt=prompts[i], index=i, batch_indices=idx, **common) for idx in batches for i in idx}
    if args.resume:  # every folder before the first video: a refusal never comes in the middle of the run
        try:
            for i in mine:
                ResumeState(paths[i]).check(keys[i])
        except ResumeError as e:
            raise BadInput(str(e)) from None
        for i in mine:  # an existing video is continued or kept only when this command wrote it
            if paths[i].exists() and not args.overwrite and not written_by(paths[i], keys[i]):
                raise BadInput(f"--resume: {paths[i]} exists and was written by another run (or has no sidecar "
                               "JSON); add --overwrite to replace it, or choose another --output")
    cfg = pipe.model.cfg
    for k, idx in enumerate(batches):
        if stop.requested:
            later = [i for later_idx in batches[k:] for i in later_idx]
            print(f"not generated ({stop.requested}): {', '.join(str(paths[i]) for i in later)}", file=sys.stderr)
            break
        states = [ResumeState(paths[i]) for i in idx]
        if args.resume and all(finished(paths[i], keys[i], args.num_chunks, fps, opts.record_selection) for i in idx):
            for i, st in zip(idx, states):
                print(f"kept {paths[i]} (finished by an earlier run of this command)", file=sys.stderr)
                if not args.keep_chunks and st.chunks() <= args.num_chunks:
                    st.remove()  # left by a run stopped between its commit and this removal
            continue
        replay = None
        if args.resume:
            replay = batch_replay(states, args.num_chunks,
                                  (cfg.in_channels, cfg.chunk_frames, *pipe.latent_hw),
                                  note=lambda msg: print(f"note: {msg}", file=sys.stderr))
            if replay is not None and not args.quiet:
                print(f"resuming {', '.join(str(paths[i]) for i in idx)}: {len(replay)} of {args.num_chunks} chunks "
                      "kept", file=sys.stderr)
        # every video streams into its mp4 while the rollout runs (host memory flat in its length); each is
        # committed with its JSON after the rollout, or removed on an error
        files = []
        try:
            for i in idx:
                files.append(VideoFiles(paths[i], fps, with_selection=opts.record_selection))
            for i, st in zip(idx, states):
                st.begin(keys[i], keep=0 if replay is None else replay.kept)

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
                          states, [keys[i] for i in idx])
        except OutputError as e:  # (a dead encoder's broken pipe arrives as one: mp4.Mp4Writer, VideoFiles)
            if stop.requested is not None:
                # a signal to the whole job (Slurm, systemd) reaches the encoders too: they end their files early
                print(f"stopped by {stop.requested}, which also stopped the video encoder (a signal to the whole "
                      f"job): the videos in progress are not written (--resume continues them); signal sample.py alone to "
                      "keep them",
                      file=sys.stderr)
                return stop.exit_code()
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
    """Under a launcher with several processes, --device auto / cuda is this process's GPU: cuda:LOCAL_RANK, or
    cuda:0 where the process sees one GPU only (CUDA_VISIBLE_DEVICES set per process, as Slurm does)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device in ("auto", "cuda"):
        import torch

        if device == "cuda" or torch.cuda.is_available():
            return "cuda:0" if torch.cuda.device_count() == 1 else f"cuda:{launcher_int('LOCAL_RANK', '0')}"
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
            part += f", {t['replayed_chunks']} replayed from the kept chunks"
        if t["first_chunk_latency_s"] is not None:
            part += f", first chunk {t['first_chunk_latency_s']:.2f}s, {t['fps_with_decode'] or 0:.2f} fps with decode"
        print(f"wrote {path} ({meta['frames']} frames{part})" + ("; --resume continues it" if stopped else ""),
              file=sys.stderr)
    if stopped is None and not args.keep_chunks:  # the batch is replayed whole: its folders go when every video
        # of it is committed
        for st in states:
            if st.chunks() <= done:  # (one asked for fewer chunks than a stopped run had made keeps them)
                st.remove()


