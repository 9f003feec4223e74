"""StageWorker: a job whose consumer left (client cancel, deadline) still has its outcome retrieved, and its slot
released."""

import asyncio
import gc
import time

import pytest

from smartdiff.shared.errors import Cancelled
from smartdiff.shared.worker import StageWorker


def test_a_job_whose_consumer_left_releases_its_slot_and_logs_no_unretrieved_exception(caplog):
    worker = StageWorker("stage", max_pending=1)

    def job(emit, should_stop):
        emit("started")
        while not should_stop():
            time.sleep(0.01)
        raise Cancelled("stopped at a check")

    async def main():
        stream = worker.stream(job)
        assert await stream.__anext__() == "started"
        await stream.aclose()  # the consumer leaves: the job is told to stop
        for _ in range(200):
            if worker.pending == 0:
                break
            await asyncio.sleep(0.01)
        return worker.pending

    try:
        assert asyncio.run(main()) == 0
        gc.collect()  # an unretrieved future exception is reported when the future is collected
    finally:
        worker.shutdown()
    assert "never retrieved" not in caplog.text


def test_out_of_device_memory_is_resource_exhausted_with_the_devices_message_and_the_next_job_runs():
    import grpc
    import pytest
    import torch

    from smartdiff.shared.errors import to_status

    worker = StageWorker("vae", max_pending=1)

    def oom(emit, should_stop):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB.\nSee the allocator docs.")

    def ok(emit, should_stop):
        return 42

    async def main():
        with pytest.raises(Exception) as caught:
            async for _ in worker.stream(oom):
                pass
        return caught.value, [item async for item in worker.stream(ok)]

    try:
        error, items = asyncio.run(main())
    finally:
        worker.shutdown()
    code, message = to_status(error)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert message.startswith("vae: out of device memory for this request (CUDA out of memory. Tried to allocate 9.00")
    assert "allocator docs" not in message and worker.pending == 0
    assert items[-1].value == 42  # the worker goes on serving


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the closed loop's generator, below
def test_a_job_still_running_when_its_event_loop_closed_is_told_to_stop_not_failed():
    """A server stopped after its drain ran out closes the loop while a job runs: the job's next progress report
    must not raise (on a multi-GPU pod rank 0 would leave the job out of step with the other ranks, which then
    crash); it is told to stop at its next check instead."""
    import threading

    worker = StageWorker("stage", max_pending=1)
    go, seen = threading.Event(), {}

    def job(emit, should_stop):
        emit("started")
        go.wait(10)
        emit("a step later")  # the loop is closed by now
        seen["stop"] = should_stop()
        return "done"

    # a loop closed by hand with the consumer still waiting: asyncio.run would cancel the consumer first, whose
    # own cleanup tells the job to stop, and the test would pass without the emit's handling
    loop = asyncio.new_event_loop()
    stream = worker.stream(job)
    assert loop.run_until_complete(stream.__anext__()) == "started"
    loop.create_task(stream.__anext__())
    loop.run_until_complete(asyncio.sleep(0.05))
    loop.close()
    go.set()
    for _ in range(200):
        if seen:
            break
        time.sleep(0.01)
    assert seen == {"stop": True}
    del stream
    gc.collect()  # here, not in a later test: its cleanup cannot run on the closed loop (reported as unraisable)


class FakeServer:
    """What start_stage uses of a StageServer, listening nowhere; `stopped` records stop() calls."""

    stopped: list = []

    def __init__(self, *a, **kw):
        self.server = None

    def add_port(self, address):
        return 1

    async def start(self):
        pass

    async def mark_serving(self):
        pass

    async def stop(self, grace):
        self.stopped.append(grace)


def test_the_stage_device_is_current_on_the_worker_thread_where_warm_up_and_jobs_run(monkeypatch):
    """Threads start on cuda:0 and Triton kernels launch on the current device: a stage on cuda:1 must make its
    device current on the thread that runs its warm-up and its requests."""
    import threading

    import torch

    from smartdiff.shared import serving

    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: made_current.append((d, threading.current_thread().name)))
    worker = StageWorker("vae", device=torch.device("cuda", 1))
    cpu_worker = StageWorker("text_encoder", device="cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    bare_worker = StageWorker("denoiser", device="cuda")  # the default device: the one current where it was made
    ran = []
    monkeypatch.setattr(serving, "StageServer", FakeServer)

    async def main():
        servicer = type("Servicer", (), {"worker": worker})()
        await serving.start_stage("svc", lambda s, server: None, servicer, "127.0.0.1:0", 1,
                                  warmup=lambda: ran.append(threading.current_thread().name))
        async for _ in worker.stream(lambda emit, stop: ran.append(threading.current_thread().name)):
            pass
        async for _ in cpu_worker.stream(lambda emit, stop: None):
            pass
        async for _ in bare_worker.stream(lambda emit, stop: None):
            pass

    asyncio.run(main())
    assert len(set(ran)) == 1 and ran[0].startswith("vae-worker")  # warm-up and job: the worker's one thread
    assert made_current[0] == (torch.device("cuda", 1), ran[0])  # set there once; nothing for the CPU stage
    assert [d for d, _ in made_current[1:]] == [torch.device("cuda", 2)]


def test_a_warm_up_out_of_device_memory_is_a_startup_error_naming_the_flags(monkeypatch):
    """A stage whose warm-up does not fit the GPU (level 3 on a small card with --compile on) exits with a line
    that says so and what to change, not a traceback; its port is released."""
    import pytest
    import torch

    from smartdiff.shared import serving
    from smartdiff.shared.memory import MemoryPolicyError

    monkeypatch.setattr(serving, "StageServer", FakeServer)
    FakeServer.stopped = stopped = []

    def warmup():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 14.2 GiB\nmore")

    servicer = type("Servicer", (), {"worker": StageWorker("denoiser")})()
    with pytest.raises(MemoryPolicyError) as err:
        asyncio.run(serving.start_stage("smartdiff.denoiser.v1.DenoiserService", lambda s, server: None, servicer,
                                        "127.0.0.1:0", 1, warmup=warmup))
    message = str(err.value)
    assert message.startswith("DenoiserService: the warm-up before SERVING ran out of device memory (CUDA out of "
                              "memory. Tried to allocate 14.2 GiB)")
    assert "--low-mem-level 3" in message and "--compile off" in message and stopped == [0]


def test_a_drained_process_exits_without_waiting_for_a_job_still_running(tmp_path):
    """SIGTERM's drain has ended, but a job (a long DiT block on a CPU) still runs on the worker thread: the
    process exits now instead of joining that thread at interpreter exit."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import asyncio, logging, time
        from smartdiff.shared.serving import exit_if_work_left
        from smartdiff.shared.worker import StageWorker

        logging.basicConfig(level="WARNING")

        async def main():
            worker = StageWorker("denoiser")
            await exit_if_work_left(wait=0.5)  # idle: returns
            task = asyncio.ensure_future(worker.stream(lambda emit, stop: time.sleep(120)).__anext__())
            while not worker.pending:
                await asyncio.sleep(0.01)
            await exit_if_work_left(wait=0.5)
            task.cancel()

        asyncio.run(main())
        print("not reached: the interpreter would join the worker thread for 120 s")
    """)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and time.monotonic() - start < 30, done
    assert "work still running on denoiser" in done.stderr and "not reached" not in done.stdout


def test_after_the_drain_a_job_that_stops_when_told_is_waited_for():
    """The server's stop cancelled the call: a job that checks `stop` ends within the wait, and the process goes on
    to its normal exit (a multi-GPU rank 0 then tells the other ranks to stop)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import asyncio, time
        from smartdiff.shared.serving import exit_if_work_left
        from smartdiff.shared.worker import StageWorker

        def job(emit, stop):
            while not stop():
                time.sleep(0.02)

        async def main():
            worker = StageWorker("denoiser")
            task = asyncio.ensure_future(worker.stream(job).__anext__())
            while not worker.pending:
                await asyncio.sleep(0.01)
            task.cancel()  # as the server's stop cancels the call
            await asyncio.gather(task, return_exceptions=True)
            await exit_if_work_left(wait=10)
            print("reached, pending", worker.pending)

        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "reached, pending 0" in done.stdout, done
