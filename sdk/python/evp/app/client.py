"""The module's connection to the agent, as upstream's ``evp.app.client`` (PYTHON-SDK.md §2.4)."""

import datetime
import math

from .backend import Backend
from .command import CommandHandler
from .executor import ClientExecutor


class Client:
    """One per process: the backend, the command handler and the executor."""

    def __init__(self, commands_cls=CommandHandler):
        self._backend = Backend()
        self.commands = commands_cls(self)
        self.executor = ClientExecutor(self)

    @property
    def backend(self):
        return self._backend

    @property
    def config(self):
        return self._config

    @config.setter
    def config(self, handler):
        # Only kept: a ConfigHandlerBase registers itself when it is made.
        self._config = handler

    def workspace_dir(self):
        """The instance's workspace folder."""
        return self.backend.get_workspace_directory()

    def run(self, timeout=None):
        """Runs queued work and at most one agent event; with ``timeout`` (ms), returns once
        that much time has passed. Returns None; ``ShouldExit`` comes out of it."""
        start = datetime.datetime.now()

        def left_ms():
            elapsed = (datetime.datetime.now() - start) / datetime.timedelta(milliseconds=1)
            return timeout - elapsed

        while self.executor.run(None if timeout is None else math.ceil(max(0, left_ms()))):
            if timeout is not None and left_ms() <= 0:
                break
        return None
