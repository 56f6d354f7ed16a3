"""Telemetry, as upstream's ``evp.app.telemetry`` (PYTHON-SDK.md §2.8)."""


class Telemetry:
    """Sends telemetry entries ``[(key, json_text)]``; override ``complete(reason)`` (SENT 0,
    ERROR 1, EXIT 2, DENIED 3)."""

    def __init__(self, client):
        self.client = client

    def complete(self, reason: int):
        pass

    def send(self, telemetries):
        self.client.backend.send_telemetry(telemetries, self.complete)
