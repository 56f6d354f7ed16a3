"""A python module written only against the upstream evp.app API: each configuration comes
back as the state of the same topic and as a telemetry entry of that key; the direct command
`echo` answers its params, any other method METHOD_NOT_FOUND."""

from evp.app.client import Client
from evp.app.command import CommandBase, CommandResponseStatus
from evp.app.configuration import ConfigHandlerBase
from evp.app.exceptions import ShouldExit
from evp.app.state import State
from evp.app.telemetry import Telemetry

NAME = "py-echo"


class Echo(ConfigHandlerBase):
    def __init__(self, client):
        super().__init__(client)
        self.state = State(client)
        self.telemetry = Telemetry(client)

    def handle(self, topic, config):
        print(f"{NAME}: configuration {topic} ({len(config)} bytes)")
        self.state.send(topic, config)
        self.telemetry.send([(topic, config)])


class Command(CommandBase):
    def handle(self, params):
        if self.name == "echo":
            self.respond(params, CommandResponseStatus.OK)
        else:
            error = '{"error": "unknown method %s"}' % self.name
            self.respond(error, CommandResponseStatus.METHOD_NOT_FOUND)

    def complete(self, reason):
        pass


def main():
    client = Client()
    client.config = Echo(client)
    client.commands.register(Command)
    print(f"{NAME}: started in {client.workspace_dir()}")
    try:
        while True:
            client.run(1000)
    except ShouldExit:
        print(f"{NAME}: told to exit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
