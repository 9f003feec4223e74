"""MP4 encoding of decoded frames: H.264 / yuv420p through the ffmpeg binary bundled with imageio-ffmpeg."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch


Frames = torch.Tensor | np.ndarray


def write_mp4(frames: Frames | Iterable[Frames], path: str | Path, fps: int = 16, crf: int = 10,
              progress=None, total: int | None = None) -> Path:
    """Write uint8 RGB frames [F, H, W, 3] to an H.264 (libx264, yuv420p) mp4 file; `progress(i, total)` after frame
    i (1-based) went to the encoder.

    `frames` may also be an iterable of such pieces, in order, all of one size: each piece goes to the encoder when
    it comes, and ffmpeg (its own process) encodes it while the caller makes the next one, so an mp4 of frames
    decoded piece by piece is ready soon after the last piece. Pass `total` (the frame count) for the progress.

    Odd widths or heights are refused with ValueError (4:2:0 chroma needs even sizes), never resized.
    crf: x264 constant rate factor, 0 (lossless luma) .. 51 (worst); 10 is what Wan's own writer uses
    (imageio quality 8). `-movflags +faststart` puts the index first so players can stream the file.
    """
    if isinstance(frames, (torch.Tensor, np.ndarray)):
        pieces = [_as_frames(frames)]  # checked before ffmpeg starts
        total = len(pieces[0])
    else:
        pieces = frames
    writer, size, count, complete = None, None, 0, False
    try:
        for piece in pieces:
            array = _as_frames(piece)
            if writer is None:
                size = array.shape[1:3]
                writer = _start_ffmpeg(path, size, fps, crf)
            elif array.shape[1:3] != size:
                raise ValueError(f"frames: every piece must be {size[1]}x{size[0]}, got {array.shape[2]}x{array.shape[1]}")
            for frame in array:
                writer.send(frame)
                count += 1
                if progress is not None:
                    progress(count, total)
        if writer is None:
            raise ValueError("frames: got no frames")
        complete = True
    finally:
        if writer is not None:
            _stop_ffmpeg(writer, complete)
    return Path(path)


class _Abandon(BaseException):
    """Thrown into imageio-ffmpeg's writer, which kills ffmpeg on a BaseException; its close() waits for ffmpeg to
    finish encoding, which on an error or a cancel is a file nobody will read (seconds at 720p)."""


def _stop_ffmpeg(writer, finish: bool) -> None:
    if finish:
        writer.close()  # waits for the encode to end and the index to be written
        return
    try:
        writer.throw(_Abandon())
    except _Abandon:
        pass


def _start_ffmpeg(path: str | Path, size: tuple[int, int], fps: int, crf: int):
    import imageio_ffmpeg  # its ffmpeg binary is needed only for mp4 output

    h, w = size
    writer = imageio_ffmpeg.write_frames(
        str(path), (w, h), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
        quality=None, macro_block_size=1, output_params=["-crf", str(crf), "-movflags", "+faststart", "-f", "mp4"],
    )
    writer.send(None)  # start ffmpeg
    return writer


def encode_mp4(frames: Frames | Iterable[Frames], fps: int = 16, crf: int = 10, progress=None,
               total: int | None = None) -> bytes:
    """The bytes of the mp4 `write_mp4` would write (frames whole or in pieces), through a file (mp4 needs a
    seekable output) that has no name where Linux allows it: the kernel frees it whatever way the process ends (a
    VAE killed mid-encode left its temporary file in /tmp, an emptyDir that outlives container restarts)."""
    with _unnamed_file() as path:
        write_mp4(frames, path, fps, crf, progress, total)
        return path.read_bytes()


def probe_mp4(video: str | Path | bytes) -> tuple[int, int, int, float]:
    """(frames, width, height, fps) of an mp4 file or its bytes; frames are counted by decoding."""
    with _as_path(video) as path:
        import imageio_ffmpeg

        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        count = sum(1 for _ in reader)
    width, height = meta["size"]
    return count, width, height, float(meta["fps"])


def read_mp4(video: str | Path | bytes) -> np.ndarray:
    """Decode an mp4 (file or bytes) to uint8 RGB frames [F, H, W, 3]."""
    with _as_path(video) as path:
        import imageio_ffmpeg

        reader = imageio_ffmpeg.read_frames(str(path))
        width, height = next(reader)["size"]
        frames = [np.frombuffer(buf, np.uint8).reshape(height, width, 3) for buf in reader]
    return np.stack(frames)


def _as_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], F >= 1; got {array.dtype} {list(array.shape)}")
    h, w = array.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even width and height, got {w}x{h}")
    return np.ascontiguousarray(array)


@contextmanager
def _unnamed_file() -> Iterator[Path]:
    """A path to a file removed from its folder as soon as it is made, /proc/<pid>/fd/<fd>: ffmpeg writes through
    it, we read it back through it, and the file goes when the last process holding it ends. Where there is no
    /proc (macOS), a named temporary file."""
    proc_fd = Path(f"/proc/{os.getpid()}/fd")
    if not proc_fd.is_dir():
        with _temp_mp4() as path:
            yield path
        return
    fd, name = tempfile.mkstemp(suffix=".mp4")
    os.unlink(name)
    try:
        yield proc_fd / str(fd)
    finally:
        os.close(fd)


@contextmanager
def _temp_mp4() -> Iterator[Path]:
    fd, name = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        yield Path(name)
    finally:
        os.unlink(name)


@contextmanager
def _as_path(video: str | Path | bytes) -> Iterator[Path]:
    if not isinstance(video, bytes):
        yield Path(video)
        return
    with _temp_mp4() as path:
        path.write_bytes(video)
        yield path
