"""StageWorker: a job whose consumer left (client cancel, deadline) still has its outcome retrieved, and its slot
released."""

import asyncio
import gc
import time

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
