"""Upload validation: the body-size cap (ASGI middleware) and the one way upload bytes become an image.

Uploaded bytes only ever go through :func:`cifarlens.images.load_image` (never unpickled,
never written to a path we choose). Failures are :class:`ApiError` with the HTTP status the
client gets: 400 bytes that are not a (whole) image, 413 too many bytes or pixels.
"""

from __future__ import annotations

import json

import anyio
import torch

from cifarlens.errors import CifarlensError
from cifarlens.images import ImageTooLarge, load_image

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
UPLOAD_PATHS = ("/api/predict", "/api/explain")


class ApiError(Exception):
    """An error answered as JSON with its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def decode_upload(data: bytes, filename: str | None, in_channels: int, image_size: int) -> torch.Tensor:
    """Upload bytes -> uint8 (C, H, W) at the model's size, through the one image decoder."""
    if not data:
        raise ApiError(400, "the uploaded file is empty")
    name = f"upload {filename[:80]!r}" if filename else "upload"
    try:
        return load_image(data, in_channels, image_size, name=name)
    except ImageTooLarge as err:  # decompression-bomb guard
        raise ApiError(413, str(err)) from None
    except CifarlensError as err:
        raise ApiError(400, str(err)) from None


class UploadLimit:
    """ASGI middleware: answer 413 JSON for bodies over ``max_bytes`` without reading them whole.

    A declared Content-Length over the cap is refused before the app runs (no byte of
    the body is read). A body without one (chunked) or lying about it is counted as it
    streams; once past the cap the app's read fails and whatever it would have answered
    is replaced by the 413. The connection is closed after the answer.
    """

    # After the 413 is written, what the client is still sending is read and dropped for at
    # most this long before closing: closing a socket with unread data makes the kernel send
    # a reset, and most clients (browsers, httpx, curl) then report "connection reset" instead
    # of the answer they already received. Bounded in time, and nothing is kept.
    drain_seconds = 2.0

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(receive, send, int(declared))

        received, exceeded, responded = 0, False, False

        async def counting_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message):
            nonlocal responded
            if exceeded:  # swap the app's answer to the failed read (400, 500...) for the 413
                if message["type"] == "http.response.start" and not responded:
                    responded = True
                    await self._reject(receive, send, None)
                return
            if message["type"] == "http.response.start":
                responded = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not responded:
            await self._reject(receive, send, None)

    async def _reject(self, receive, send, declared: int | None) -> None:
        size = f"{declared:,} bytes" if declared is not None else f"more than {self.max_bytes:,} bytes"
        body = json.dumps({"error": f"upload too large: {size}; the limit is {self.max_bytes:,} bytes "
                                    f"({self.max_bytes / 2**20:.3g} MiB)", "status": 413}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body, "more_body": True})  # the client has it all now
        with anyio.move_on_after(self.drain_seconds):
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    break
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _BodyTooLarge(Exception):
    pass
