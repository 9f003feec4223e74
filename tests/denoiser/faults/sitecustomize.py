"""Faults for the multi-process denoiser tests, loaded by every rank through PYTHONPATH (test only).

SMARTDIFF_TEST_FAULT="RANK:CALL:KIND": on rank RANK, the CALL-th DiT forward (1-based; the warm-up makes the
first) raises a RuntimeError (KIND "raise") or runs out of memory (KIND "oom"), or (KIND "exit0") the rank exits
with code 0 when it waits for its CALL-th job header (the first comes after the warm-up: rank 0 serves).
SMARTDIFF_TEST_JOB_TIMEOUT=SECONDS shortens the jobs' collective timeout (and the rendezvous: keep it some
seconds).
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
                from smartdiff.services.denoiser.distributed import RequestChannel

                real_receive, headers = RequestChannel.receive, [0]

                def receive(self):
                    headers[0] += 1
                    if headers[0] == int(when):
                        os._exit(0)
                    return real_receive(self)

                RequestChannel.receive = receive
            else:
                from smartdiff.services.denoiser.dit import WanDiT

                real, calls = WanDiT.forward, [0]

                def forward(self, *args, **kwargs):
                    calls[0] += 1
                    if calls[0] == int(when):
                        import torch

                        error = torch.OutOfMemoryError if kind == "oom" else RuntimeError
                        raise error(f"injected failure on rank {rank}")
                    return real(self, *args, **kwargs)

                WanDiT.forward = forward
