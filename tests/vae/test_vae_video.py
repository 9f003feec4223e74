"""MP4 writing: frame count, size and fps survive the round trip through H.264."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smartdiff.services.vae.engine import VaeEngine
from smartdiff.services.vae.video import encode_mp4, probe_mp4, read_mp4, write_mp4
from smartdiff.shared.config import load_model_config


def gradient_frames(f: int = 9, h: int = 32, w: int = 48) -> np.ndarray:
    """Smooth moving ramps (compress well, so decoded pixels stay close to the input)."""
    t, y, x = np.meshgrid(np.arange(f), np.arange(h), np.arange(w), indexing="ij")
    rgb = np.stack([x * 255 / w, y * 255 / h, (t * 20 + x + y) % 256], axis=-1)
    return rgb.astype(np.uint8)


def test_write_mp4_round_trip(tmp_path):
    frames = gradient_frames()
    path = write_mp4(frames, tmp_path / "clip.mp4", fps=16)
    assert probe_mp4(path) == (9, 48, 32, 16.0)
    decoded = read_mp4(path)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 4


def test_encode_mp4_bytes_decode_back(tmp_path):
    data = encode_mp4(torch.from_numpy(gradient_frames(5, 16, 16)), fps=24)
    assert data[4:8] == b"ftyp"
    assert probe_mp4(data) == (5, 16, 16, 24.0)


def test_decoded_latents_become_a_video():
    engine = VaeEngine.random(load_model_config("wan-tiny").vae)
    frames = engine.decode(torch.randn(1, 16, 2, 2, 3))[0]  # [5, 16, 24, 3]
    assert probe_mp4(encode_mp4(frames)) == (5, 24, 16, 16.0)


@pytest.mark.parametrize("shape,dtype,match", [
    ((3, 15, 16, 3), np.uint8, "even"),
    ((3, 16, 17, 3), np.uint8, "even"),
    ((3, 16, 16, 3), np.float32, "uint8"),
    ((3, 16, 16), np.uint8, "uint8"),
])
def test_bad_frames_are_refused(tmp_path, shape, dtype, match):
    with pytest.raises(ValueError, match=match):
        write_mp4(np.zeros(shape, dtype), tmp_path / "x.mp4")


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="Linux: files without a name")
def test_encoding_leaves_no_named_file_a_killed_process_could_leave_behind():
    """While ffmpeg writes the mp4 no file has a name in the temp folder (a VAE killed mid-encode left one in
    /tmp, an emptyDir that outlives container restarts); the result is a complete, streamable mp4."""
    import glob
    import os
    import tempfile

    pattern = os.path.join(tempfile.gettempdir(), "*.mp4")
    before, seen = set(glob.glob(pattern)), []
    frames = (torch.rand(9, 32, 48, 3) * 255).to(torch.uint8)
    data = encode_mp4(frames, fps=16, progress=lambda i, n: seen.append(set(glob.glob(pattern)) - before))
    assert len(seen) == 9 and not any(seen)
    assert probe_mp4(data)[:3] == (9, 48, 32)
    assert 0 < data.index(b"moov") < data.index(b"mdat")  # +faststart: the index first


def test_frames_in_pieces_encode_as_they_come_to_the_same_video():
    frames = gradient_frames(9, 16, 32)
    seen = []

    def pieces():
        for a, b in ((0, 1), (1, 5), (5, 9)):
            seen.append(("piece", b - a))
            yield torch.from_numpy(frames[a:b])

    data = encode_mp4(pieces(), fps=16, total=9, progress=lambda i, n: seen.append((i, n)))
    assert seen[:3] == [("piece", 1), (1, 9), ("piece", 4)] and seen[-1] == (9, 9)  # each piece encoded on arrival
    assert np.array_equal(read_mp4(data), read_mp4(encode_mp4(frames, fps=16)))


@pytest.mark.parametrize("pieces,match", [
    ([np.zeros((1, 16, 16, 3), np.uint8), np.zeros((1, 16, 32, 3), np.uint8)], "every piece must be 16x16"),
    ([], "no frames"),
])
def test_pieces_of_another_size_or_none_are_refused(tmp_path, pieces, match):
    with pytest.raises(ValueError, match=match):
        write_mp4(iter(pieces), tmp_path / "x.mp4")


def test_an_error_between_pieces_kills_ffmpeg_instead_of_waiting_for_its_encode(monkeypatch):
    """A cancel or a bad piece mid-decode must not hold the VAE's worker while ffmpeg finishes a file nobody will
    read: ffmpeg is killed, not waited for."""
    import signal
    import subprocess

    import imageio_ffmpeg._io as ffmpeg_io

    started = []

    class Recorded(subprocess.Popen):
        def __init__(self, args, *a, **kw):
            super().__init__(args, *a, **kw)
            if "-crf" in args:  # an encode (not imageio-ffmpeg's version probe)
                started.append(self)

    monkeypatch.setattr(ffmpeg_io.subprocess, "Popen", Recorded)

    def pieces():
        yield (torch.rand(8, 64, 64, 3) * 255).to(torch.uint8)
        raise RuntimeError("cancelled after latent frame 2/21")

    with pytest.raises(RuntimeError, match="cancelled"):
        encode_mp4(pieces(), total=81)
    assert len(started) == 1 and started[0].wait(10) == -signal.SIGKILL
    encode_mp4(gradient_frames(3, 16, 16))  # and a complete one is waited for
    assert started[1].wait(10) == 0
