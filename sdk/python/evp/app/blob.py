"""Blob transfers made by the module itself over HTTP, as upstream's ``evp.app.blob``
(PYTHON-SDK.md §2.10): a transfer runs on a thread of its own; file streams read and write
the workspace directly, memory streams hand each chunk to the main thread (``Client.run``);
the completion runs on the main thread too.

Two fixes against upstream, neither visible to a working module: with ``EVP_HTTPS_CA_CERT``
the server *is* verified against that CA (upstream loads it but verifies nothing), and the
stream is closed before the completion is queued (so a written file is complete when
``complete`` runs).
"""

import io
import os
import ssl
import threading
import urllib.error
import urllib.request
from enum import Enum
from pathlib import Path

#: Read size of a download, as upstream.
GET_CHUNK = 1024


class BlobReason(Enum):
    DONE = 0
    EXIT = 1
    DENIED = 2


class BlobResult(Enum):
    SUCCESS = 0
    ERROR = 1
    ERROR_HTTP = 2


class BlobResultHttpExt:
    def __init__(self, result, http_status: int, error: int = 0):
        self.result = result
        self.http_status = http_status
        self.error = error


class BlobIoBase(io.BufferedIOBase):
    def __init__(self, client):
        self.client = client
        self._size = None

    @property
    def executor(self):
        return self.client.executor

    @property
    def size(self):
        if self._size is None:
            self._size = self.get_size()
        return self._size

    def get_size(self):
        return None


class BlobFileBase(BlobIoBase):
    MODE = "rb"

    def __init__(self, client, path):
        super().__init__(client)
        self.path = Path(path)
        self.pos = 0
        self.file = self.path.open(self.MODE)

    def close(self):
        self.file.close()

    def read(self, size=-1):
        raise NotImplementedError

    def write(self, buf):
        raise NotImplementedError


class BlobFileReader(BlobFileBase):
    MODE = "rb"

    def get_size(self):
        return self.path.stat().st_size

    def read(self, size=-1):
        if self.pos >= self.size:
            return None
        chunk = self.file.read(size)
        self.pos += len(chunk)
        return chunk


class BlobFileWriter(BlobFileBase):
    MODE = "wb"

    def write(self, buf):
        return self.file.write(buf)


class BlobMemoryBase(BlobIoBase):
    def __init__(self, client, size=None):
        super().__init__(client)
        self.pos = 0
        self._size = size

    def handle(self, *args, **kwargs):
        raise NotImplementedError


class BlobMemoryReader(BlobMemoryBase):
    def read(self, size=-1):
        if self.pos >= self.size:
            return None
        chunk = self.executor.submit(self.handle, size).result()
        self.pos += len(chunk)
        return chunk


class BlobMemoryWriter(BlobMemoryBase):
    def write(self, buf):
        return self.executor.submit(self.handle, buf).result()


def _ssl_context():
    """The CA of ``EVP_HTTPS_CA_CERT`` when set (the server verified against it), else
    urllib's default (the system's CAs)."""
    ca = os.environ.get("EVP_HTTPS_CA_CERT", "")
    if not ca:
        return None
    return ssl.create_default_context(cafile=ca)


class BlobOperationBase:
    METHOD = None

    def __init__(self, client, url, stream, headers={}):
        if not isinstance(stream, BlobIoBase):
            raise TypeError("stream must be a BlobIoBase")
        self.client = client
        self.url = url
        self.headers = dict(headers)
        self.stream = stream
        self.thread = threading.Thread(target=self._run)

    @property
    def executor(self):
        return self.client.executor

    def start(self):
        self.thread.start()

    def request(self):
        return urllib.request.Request(self.url, headers=self.headers, method=self.METHOD)

    def respond(self, response):
        pass

    def complete(self, reason, result):
        pass

    def _run(self):
        error = None
        try:
            with urllib.request.urlopen(self.request(), context=_ssl_context()) as response:
                self.respond(response)
                outcome = (BlobReason.DONE, BlobResultHttpExt(BlobResult.SUCCESS, response.status, 0))
        except urllib.error.HTTPError as e:
            outcome = (BlobReason.DENIED, BlobResultHttpExt(BlobResult.ERROR_HTTP, e.code, 0))
        except Exception as e:
            outcome = (BlobReason.DENIED, BlobResultHttpExt(BlobResult.ERROR, 0, 0))
            error = e
        finally:
            self.stream.close()
        self.executor.submit(self.complete, *outcome)
        if error is not None:
            raise error


class BlobOperationGet(BlobOperationBase):
    METHOD = "GET"

    def respond(self, response):
        while True:
            chunk = response.read(GET_CHUNK)
            if not chunk:
                break
            self.stream.write(chunk)


class BlobOperationPut(BlobOperationBase):
    METHOD = "PUT"

    def request(self):
        headers = dict(self.headers)
        headers["Content-Length"] = str(self.stream.size)
        return urllib.request.Request(
            self.url, data=self.stream, headers=headers, method=self.METHOD
        )
