"""`--nproc-per-node N`: start the N ranks of a multi-GPU denoiser and stand between them and the pod's signals.

torchrun does the same job, but on SIGTERM it SIGKILLs the ranks 30 s later and then exits 1, so a denoiser under
it cannot drain for longer than that: a rolling update cuts the videos in flight. This launcher:
- starts rank r as `python -m smartdiff.services.denoiser ARGS` with torchrun's variables (RANK, LOCAL_RANK,
  WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT: a free port), output to its own;
- passes the first SIGTERM / SIGINT on to every rank and waits for as long as they drain (rank 0 drains; the
  others stop when rank 0 tells them): the pod's terminationGracePeriodSeconds is the bound, as for the other
  stages. A second SIGINT (Ctrl-C again) kills the ranks; a second SIGTERM changes nothing;
- when a rank fails, rank 0 ends while others linger, or another rank ends while rank 0 serves (only rank 0 tells
  them to stop), stops the rest (SIGTERM, SIGKILL `STOP_GRACE` s later: a rank waiting on a dead peer in a
  collective never returns by itself);
- exits 0 when every rank exited 0, else with the first failure's code (128 + N for a signal N);
- has the kernel kill the ranks if it dies itself (Linux: PR_SET_PDEATHSIG), so that none is left holding a GPU.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time

log = logging.getLogger("smartdiff.denoiser.launch")

LAUNCHED_ENV = "SMARTDIFF_DENOISER_LAUNCHED"  # set in the ranks' environment: they serve, they do not launch
STOP_GRACE = 10.0  # seconds between the SIGTERM and the SIGKILL of ranks left behind by a failed or finished peer
FOLLOWER_GRACE = 5.0  # seconds rank 0 may go on after a follower ended with 0 (rank 0 told it to: rank 0 is ending)
POLL = 0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_code(returncode: int) -> int:
    """A shell's convention: 128 + N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _die_with_parent(parent: int):
    """preexec_fn of a rank: SIGKILL when the launcher dies (Linux; elsewhere nothing)."""
    def arm() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # it died before the line above
            os._exit(1)
    return arm


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return dict(os.environ, **{LAUNCHED_ENV: "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
                               "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def launch(argv: list[str], nproc: int) -> int:
    """Run `nproc` ranks of the denoiser with `argv` (the command line, --nproc-per-node included: the ranks see
    LAUNCHED_ENV and serve) until they end; returns the exit code for this process."""
    port = free_port()
    command = [sys.executable, "-m", "smartdiff.services.denoiser", *argv]
    procs: list[subprocess.Popen] = []
    received: list[int] = []

    def on_signal(sig, _frame) -> None:
        received.append(sig)
        if len(received) == 1:
            log.info("%s: passing it to the %d ranks, which drain", signal.Signals(sig).name, nproc)
            _signal_all(procs, sig)
        elif sig == signal.SIGINT:
            log.warning("SIGINT again: killing the ranks")
            _signal_all(procs, signal.SIGKILL)
        else:
            log.info("%s again: the ranks are already draining", signal.Signals(sig).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for rank in range(nproc):
            procs.append(subprocess.Popen(command, env=rank_env(rank, nproc, port),
                                          preexec_fn=_die_with_parent(os.getpid())))
            log.info("rank %d/%d started (pid %d)", rank, nproc, procs[-1].pid)
        if received:  # a signal that came while the ranks were being started reached only some of them
            _signal_all(procs, received[0])
        return _supervise(procs, stopping=lambda: bool(received))
    finally:
        for p in procs:  # only after an error of our own: _supervise returns when every rank has ended
            if p.poll() is None:
                p.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _signal_all(procs: list[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)


def _supervise(procs: list[subprocess.Popen], stopping=lambda: False) -> int:
    """Wait for the ranks; once one fails, or one exits at all while rank 0 still serves and no signal asked them
    to stop (rank 0 alone tells them to, at its shutdown), stop the others."""
    failure: tuple[int, int] | None = None  # (rank, returncode) of the first rank seen failing
    kill_at: float | None = None
    early_at: float | None = None  # when a follower was first seen ended with 0 while rank 0 ran
    while True:
        codes = [p.poll() for p in procs]
        if failure is None:
            failure = next(((r, c) for r, c in enumerate(codes) if c not in (None, 0)), None)
            if failure is not None:
                log.error("rank %d exited with code %d; stopping the other ranks", failure[0], exit_code(failure[1]))
            elif codes[0] is None and not stopping():
                early = next((r for r, c in enumerate(codes) if c == 0), None)
                early_at = early_at or (time.monotonic() if early is not None else None)
                if early is not None and time.monotonic() - early_at > FOLLOWER_GRACE:
                    log.error("rank %d exited while rank 0 serves; stopping the other ranks", early)
                    failure = (early, 1)
        if all(c is not None for c in codes):
            break
        if kill_at is None and (failure is not None or codes[0] == 0):
            kill_at = time.monotonic() + STOP_GRACE
            _signal_all(procs, signal.SIGTERM)
        if kill_at is not None and time.monotonic() > kill_at:
            kill_at = float("inf")  # once
            for r, p in enumerate(procs):
                if p.poll() is None:
                    log.error("rank %d still running %.0f s after rank %d ended; killing it", r, STOP_GRACE,
                              failure[0] if failure else 0)
                    p.kill()
                    if failure is None:
                        failure = (r, -signal.SIGKILL)
        time.sleep(POLL)
    return 0 if failure is None else exit_code(failure[1])
