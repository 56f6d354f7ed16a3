"""States, as upstream's ``evp.app.state`` (PYTHON-SDK.md §2.7)."""


class State:
    """Sends states; override ``complete(reason)`` to see how each send ended (SENT 0,
    OVERWRITTEN 1, EXIT 2, DENIED 3)."""

    def __init__(self, client):
        self.client = client

    def complete(self, reason: int):
        pass

    def send(self, topic: str, blob):
        self.client.backend.send_state(topic, blob, self.complete)
