"""The ffmpeg encoder process behind mp4.Mp4Writer: raw RGB frames in on a pipe, an H.264 mp4 out.

Why not imageio-ffmpeg's ``write_frames``: it starts ffmpeg with ``preexec_fn=os.setpgrp`` (to keep a
terminal's Ctrl+C away from it), and a ``preexec_fn`` makes Python ``fork()`` and run Python code in the
child of a process that has threads: whatever that code waits for from a thread that is not in the
child (a lock, a condition variable) never comes, and the child hangs before ``exec``, the writer with it
(imageio-ffmpeg issue #58). In this project's CI a garbage collection in the child freed a PyAV scaler,
which waited for its slice threads forever. ``start_new_session=True`` gives ffmpeg its own
process group (Ctrl+C reaches only this process, which stops after the video in progress) from C, with
no Python code between fork and exec. The command line is imageio-ffmpeg's (its bundled binary, libx264,
its quality -> crf map), so files are as before.
"""
from __future__ import annotations

import subprocess
from fractions import Fraction
from pathlib import Path

__all__ = ["Encoder", "crf_for_quality"]


def crf_for_quality(quality: float) -> int:
    """imageio-ffmpeg's quality scale 0..10 -> libx264 crf 51..0 (9 -> 5: visually lossless)."""
    return int((1 - quality / 10.0) * 51)


class Encoder:
    """One ffmpeg process encoding ``[H, W, 3]`` uint8 RGB frames of one size to ``path``.

    ``write(frame)`` sends a frame (a C-contiguous array of ``H*W*3`` bytes); a dead ffmpeg (full disk,
    killed) surfaces there as ``BrokenPipeError``. ``close()`` ends the stream, waits for the file and
    returns ffmpeg's exit code (the caller checks the file); interrupted while waiting, it kills ffmpeg
    (which has its own session: a Ctrl+C reaches only this process). ``kill()`` stops it at once (no wait
    for its backlog) and returns its exit code."""

    def __init__(self, path: str | Path, size_hw: tuple[int, int], fps: float, quality: float, pix_fmt: str):
        import imageio_ffmpeg

        h, w = size_hw
        self.path = Path(path)
        self.cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error",
            "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{w}x{h}", "-pix_fmt", "rgb24",
            "-r", str(Fraction(float(fps)).limit_denominator()), "-i", "-", "-an",
            "-vcodec", "libx264", "-pix_fmt", pix_fmt, "-crf", str(crf_for_quality(quality)),
            "-movflags", "+faststart", str(self.path),  # the index first: the file plays while it streams
        ]
        # stderr stays the caller's (ffmpeg prints only errors); stdout is unused
        self._proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      start_new_session=True)

    def write(self, frame) -> None:
        self._proc.stdin.write(memoryview(frame).cast("B"))

    def close(self) -> int:
        proc = self._proc
        try:
            proc.stdin.close()
        except BrokenPipeError:  # ffmpeg already gone: its exit code says why
            pass
        try:
            return proc.wait()
        except BaseException:  # Ctrl+C while ffmpeg finishes: not left encoding on its own
            self.kill()
            raise

    def kill(self) -> int:
        proc = self._proc
        if proc.poll() is None:
            proc.kill()
        try:
            proc.stdin.close()
        except OSError:
            pass
        return proc.wait()
