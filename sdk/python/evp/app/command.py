"""Direct commands, as upstream's ``evp.app.command`` (PYTHON-SDK.md §2.9)."""

import re
from enum import Enum


class CommandResponseStatus(Enum):
    OK = 0
    METHOD_NOT_FOUND = 1
    ERROR = 2
    MAX = 3


class CommandHandler:
    """Routes each command to every registered class whose pattern matches its method."""

    def __init__(self, client):
        self.client = client
        self.commands = []
        self.registered = False

    @property
    def backend(self):
        return self.client.backend

    def register(self, cmd, pattern=r".*", args=(), kwargs={}):
        """Runs ``cmd(self, id, name, params, *args, **kwargs)`` for methods matching
        ``pattern`` (from its start). A pattern given twice raises ``KeyError``."""
        if not self.registered:
            self.backend.set_command_handler(self)
            self.registered = True
        if any(p.pattern == pattern for p, _, _, _ in self.commands):
            raise KeyError(pattern)
        self.commands.append((re.compile(pattern), cmd, args, kwargs))

    def __call__(self, cmd_id, name, params):
        for regex, cmd, args, kwargs in self.commands:
            if regex.match(name):
                cmd(self, cmd_id, name, params, *args, **kwargs)

    def respond(self, id, response, status, complete):
        self.backend.send_command_response(id, response, status, complete)


class CommandBase:
    """One command: making it runs ``init(*args, **kwargs)`` then ``handle(params)``."""

    def __init__(self, handler, reqid, name, params, *args, **kwargs):
        self.handler = handler
        self.id = reqid
        self.name = name
        self.init(*args, **kwargs)
        self.handle(params)

    def init(self, *args, **kwargs):
        pass

    def handle(self, params):
        raise NotImplementedError

    def complete(self, reason):
        raise NotImplementedError

    def respond(self, response, status):
        self.handler.respond(self.id, response, status, self.complete)
