"""A background worker that sends the selective head's gradient pushes off the training thread.

The autograd hook of the active rows only launches the (asynchronous) reduce-scatter and hands a
job to this worker; the worker waits for the collective, moves the slice to the host and pushes it
to the parameter store, while the training thread runs the rest of the backward (and DDP's
gradient all-reduce), the optimizer step, the next batch's data and the next forward. The next
step's first store call waits for the worker (:meth:`Pusher.wait`), so pushes never overtake each
other and an error in a push surfaces on the training thread at the next step, naming the server.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Optional

logger = logging.getLogger(__name__)


class Pusher:
    """One daemon thread running submitted jobs in order."""

    def __init__(self, name: str = "hfsoftmax-pusher") -> None:
        self._q: "queue.Queue[Optional[Callable[[], None]]]" = queue.Queue()
        self._error: Optional[BaseException] = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._q.get()
            try:
                if job is None:
                    return
                if self._error is None:  # after a failure, later jobs are dropped (the error is re-raised)
                    job()
            except BaseException as e:  # re-raised on the training thread by wait()
                self._error = e
            finally:
                self._q.task_done()

    def submit(self, job: Callable[[], None]) -> None:
        if self._closed:
            raise RuntimeError("Pusher is closed")
        self.raise_error()
        self._q.put(job)

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def wait(self) -> float:
        """Block until every submitted job ran; re-raise the first failure. Returns seconds waited."""
        t0 = time.perf_counter()
        self._q.join()
        self.raise_error()
        return time.perf_counter() - t0

    def close(self) -> None:
        """Finish the queued jobs and stop the thread (errors are kept for raise_error)."""
        if not self._closed:
            self._closed = True
            self._q.put(None)
            self._thread.join(timeout=60.0)
