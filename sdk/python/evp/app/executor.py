"""Work for the main thread, as upstream's ``evp.app.executor`` (PYTHON-SDK.md §2.5): blob
threads submit work, which runs inside ``Client.run``, between agent events."""

import concurrent.futures
import queue
import threading
import time

from .exceptions import TimedOut

#: The pause after an empty poll of the agent, as upstream.
IDLE_SLEEP_S = 0.001
#: Longest wait in the agent for an event while the module has no other thread. Upstream
#: polls every millisecond (about 10% of a core per idle module, measured); with no other
#: thread nothing can submit work meanwhile, so waiting in the agent changes nothing a
#: module can observe but the CPU it costs.
MAX_IDLE_WAIT_MS = 1000


class WorkItem:
    """One submitted call and the future of its result."""

    def __init__(self, future, fn, args=(), kwargs={}):
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def run(self):
        try:
            result = self.fn(*self.args, **self.kwargs)
        except Exception as e:
            self.future.set_exception(e)
        else:
            self.future.set_result(result)


class ClientExecutor:
    """Runs submitted work and agent events on the main thread."""

    def __init__(self, client):
        self.client = client
        self.queue = queue.Queue()
        self.sem = threading.Semaphore(0)

    def submit(self, fn, *args, **kwargs):
        """Queues ``fn(*args, **kwargs)`` for the main thread; thread-safe."""
        future = concurrent.futures.Future()
        self.queue.put(WorkItem(future, fn, args, kwargs))
        return future

    def run(self, wait_ms=None):
        """Runs one queued work item, or asks the agent for one event: True to go on, False
        once an agent event was dispatched. ``ShouldExit`` and other errors propagate.

        With other threads alive (blob transfers, the module's own), which may submit work at
        any time, the agent is polled and the loop sleeps 1 ms, as upstream. A module with no
        other thread waits in the agent instead, up to ``wait_ms`` (the caller's time left)
        or ``MAX_IDLE_WAIT_MS``."""
        try:
            item = self.queue.get_nowait()
        except queue.Empty:
            item = None
        if item is not None:
            item.run()
            return True
        alone = threading.active_count() == 1
        wait = 0
        if alone:
            wait = MAX_IDLE_WAIT_MS if wait_ms is None else max(0, min(wait_ms, MAX_IDLE_WAIT_MS))
        try:
            self.client.backend.process_event(wait)
        except TimedOut:
            if not alone:
                time.sleep(IDLE_SLEEP_S)
            return True
        return False

    def notify(self):
        self.sem.release()

    def wait(self):
        self.sem.acquire()
