"""Train a causal video DiT with Resampling Forcing.

    accelerate launch [--config_file configs/accelerate/X.yaml] train/train.py --config configs/tiny.yaml [key=value ...]
    python train/train.py --config configs/tiny.yaml train.run_dir=runs/tiny   # single process

Overrides are `key.path=value` with YAML values, e.g. `train.lr=1e-4 train.batch_size=8`; integers
index lists (`train.stages.1.steps=500`) and a list can be replaced whole:
`train.stages=[{name: tf, steps: 50}, {name: rf, objective: resampling, steps: 50}]`.
Exit codes: 0 done (every stage's steps trained); 143 / 130 stopped by SIGTERM / SIGINT after saving a
checkpoint (rerun the same command to resume; a job chain waiting for success does not go on with an
unfinished run); 2 bad config / missing data / an unusable run folder (unwritable, locked by another
trainer, no space left), with ONE line on stderr naming the problem and the fix; 1 training aborted
(repeated NaN/Inf losses); 130 also when interrupted twice, or by Ctrl+C before training started (no new
checkpoint). Under `accelerate launch` the launcher reports a failed process with its own traceback and
exit code 1 after this line.

This module is the command line of train/train.py (a thin script over it, as sample/sample.py over
sampling_cli): the flags, the one-line errors and the exit codes; the training is training.py.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from .cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, BadInput, OneLineParser, doc_summary


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="train/train.py", description=doc_summary(__doc__))
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.lr=1e-4")
    try:
        args = parser.parse_args(argv)
    except BadInput as e:  # one line, as every other tool
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return _run(args)
    except KeyboardInterrupt as e:
        # the trainer's handler (signals.GracefulStop) raises it with a message on a SECOND signal; Python's
        # own Ctrl+C handler, in place until training starts (imports, data rendering, model loading), without one
        if e.args:
            print(f"{e} (the last checkpoint stays; rerun the same command to resume)", file=sys.stderr)
        else:
            print("interrupted (Ctrl+C) before training started: no new checkpoint; rerun the same command",
                  file=sys.stderr)
        return getattr(e, "exit_code", EXIT_INTERRUPTED)


def _run(args) -> int:
    from .config import ConfigError, load_config, written_by_a_run
    from .data.loader import DataError
    from .encoders import EncoderLoadError
    from .models.loading import CheckpointError

    from .io import is_no_space

    def one_line(e: BaseException) -> str:
        lines = str(e).strip().splitlines()
        return lines[0] if lines else type(e).__name__

    try:
        cfg = load_config(args.config, args.overrides, require_encoder_paths=True)
    except ConfigError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    from .checkpoint import config_file, list_checkpoints

    run = Path(cfg.train.run_dir)
    mine = config_file(run)
    if mine.is_file() and not list_checkpoints(run) and not written_by_a_run(mine):
        # a new run writes RUN/config.yaml (the resolved config): a file there that no run wrote is the
        # user's (often the --config itself); resuming a run, with checkpoints, keeps its own
        given = " (your --config)" if args.config and Path(args.config).resolve() == mine.resolve() else ""
        print(f"error: train.run_dir={run} holds a config.yaml{given} that no run wrote, which a new run would "
              "replace (its comments and layout lost); copy it elsewhere, or choose another train.run_dir",
              file=sys.stderr)
        return 2

    from .signals import exit_code
    from .training import TrainingAborted, train

    try:
        result = train(cfg)
    except (ConfigError, DataError, EncoderLoadError, CheckpointError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if not is_no_space(e):
            raise
        print(f"error: no space left on {cfg.train.run_dir} ({one_line(e)}); free some space and run the same "
              "command to resume", file=sys.stderr)
        return 2
    except TrainingAborted as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:  # once per run, not once per process
        print(f"{result['status']} at step {result['step']}; checkpoint {result['checkpoint']}")
    if result["status"] == "interrupted":  # saved, not finished: 128 + the signal, as the shell reports it
        # a rank stopped by another rank's signal has none of its own: report SIGTERM (a preemption)
        return exit_code(result.get("signal") or "SIGTERM")
    return 0
