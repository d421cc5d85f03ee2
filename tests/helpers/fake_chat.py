"""A fake OpenAI-compatible chat server on 127.0.0.1 for client tests (no network, no model).

`FakeChatServer(respond)` serves POST /v1/chat/completions from a thread on a random free port. `respond(payload,
index)` gets the decoded request body and the 0-based arrival index and returns a `Reply` (or a plain string, the
assistant text). Every payload is recorded, and the server tracks how many requests were in flight at once.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


@dataclasses.dataclass
class Reply:
    text: str = ""
    status: int = 200
    delay_s: float = 0.0
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    raw_body: bytes | None = None  # Sent instead of a chat-completion JSON when given.


def chat_body(text) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}).encode()


class FakeChatServer:
    def __init__(self, respond: Callable[[dict, int], Reply | str]):
        self.respond = respond
        self.payloads: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # Quiet.
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                payload = json.loads(self.rfile.read(length))
                with server._lock:
                    index = len(server.payloads)
                    server.payloads.append(payload)
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                counted = True

                def done():  # Leave the in-flight count before replying, so a fast client never overlaps it.
                    nonlocal counted
                    if counted:
                        counted = False
                        with server._lock:
                            server.in_flight -= 1

                try:
                    if self.path != "/v1/chat/completions":
                        reply = Reply(status=404, raw_body=b'{"error": "not found"}')
                    else:
                        reply = server.respond(payload, index)
                        reply = Reply(text=reply) if isinstance(reply, str) else reply
                    if reply.delay_s:
                        time.sleep(reply.delay_s)
                    body = reply.raw_body if reply.raw_body is not None else chat_body(reply.text)
                    done()
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # The client gave up (timeout tests).
                finally:
                    done()

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # Dropped connections are expected.
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> FakeChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def user_text(payload: dict) -> str:
    """The text part of the last user message."""
    content = payload["messages"][-1]["content"]
    return next(part["text"] for part in content if part["type"] == "text")


def payload_images(payload: dict) -> list[np.ndarray]:
    """The images of the last user message, decoded from their PNG data URLs to uint8 [H, W, 3]."""
    images = []
    for part in payload["messages"][-1]["content"]:
        if part["type"] == "image_url":
            url = part["image_url"]["url"]
            prefix = "data:image/png;base64,"
            assert url.startswith(prefix), url[:40]
            images.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :]))).convert("RGB")))
    return images
