"""The module's connection to the agent, as upstream's ``evp.app.client`` (PYTHON-SDK.md §2.4)."""

import datetime

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
        while self.executor.run():
            if timeout is not None:
                elapsed = datetime.datetime.now() - start
                if elapsed >= datetime.timedelta(milliseconds=timeout):
                    break
        return None
