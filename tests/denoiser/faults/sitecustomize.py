"""Faults for the multi-process denoiser tests, loaded by every rank through PYTHONPATH (test only).

SMARTDIFF_TEST_FAULT="RANK:CALL:KIND": on rank RANK, the CALL-th DiT forward (1-based; the warm-up makes the
first) raises a RuntimeError (KIND "raise"), or the rank exits with code 0 CALL seconds after it starts (KIND
"exit0"). SMARTDIFF_TEST_JOB_TIMEOUT=SECONDS shortens the jobs' collective timeout.
"""

import os

if "RANK" in os.environ and os.environ.get("SMARTDIFF_DENOISER_LAUNCHED"):
    if os.environ.get("SMARTDIFF_TEST_JOB_TIMEOUT"):
        from datetime import timedelta

        from smartdiff.services.denoiser import distributed

        distributed.JOB_TIMEOUT = timedelta(seconds=float(os.environ["SMARTDIFF_TEST_JOB_TIMEOUT"]))
    if os.environ.get("SMARTDIFF_TEST_FAULT"):
        rank, when, kind = os.environ["SMARTDIFF_TEST_FAULT"].split(":")
        if int(rank) == int(os.environ["RANK"]):
            if kind == "exit0":
                import threading

                threading.Timer(float(when), os._exit, (0,)).start()
            else:
                from smartdiff.services.denoiser.dit import WanDiT

                real, calls = WanDiT.forward, [0]

                def forward(self, *args, **kwargs):
                    calls[0] += 1
                    if calls[0] == int(when):
                        raise RuntimeError(f"injected failure on rank {rank}")
                    return real(self, *args, **kwargs)

                WanDiT.forward = forward
