"""Work for the main thread, as upstream's ``evp.app.executor`` (PYTHON-SDK.md §2.5): blob
threads submit work, which runs inside ``Client.run``, between agent events."""

import concurrent.futures
import queue
import threading
import time

from .exceptions import TimedOut

#: The pause after an empty poll of the agent, as upstream.
IDLE_SLEEP_S = 0.001


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

    def run(self):
        """Runs one queued work item, or polls the agent once: True to go on, False once an
        agent event was dispatched. ``ShouldExit`` and other errors propagate."""
        try:
            item = self.queue.get_nowait()
        except queue.Empty:
            item = None
        if item is not None:
            item.run()
            return True
        try:
            self.client.backend.process_event(0)
        except TimedOut:
            time.sleep(IDLE_SLEEP_S)
            return True
        return False

    def notify(self):
        self.sem.release()

    def wait(self):
        self.sem.acquire()
