"""Configuration handlers, as upstream's ``evp.app.configuration`` (PYTHON-SDK.md §2.6)."""


class ConfigHandlerBase:
    """Subclass it and override ``handle(topic, config)``; making one registers it."""

    def __init__(self, client):
        self.client = client
        client.backend.set_configuration_handler(self)

    def __call__(self, topic, config):
        self.handle(topic, config)

    def handle(self, topic: str, config: bytearray):
        raise NotImplementedError
