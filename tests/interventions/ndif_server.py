"""A loopback server that speaks NDIF's request protocol, for tests of remote runs (not a package).

It serves toy models under made-up model keys and runs requests exactly as NDIF's model actors do
(``ndif``'s ``services/ray/deployments/modeling/nns.py``): deserialize the request against the
served model's persistent objects, ``inc()``, execute the block, collect the saved locals,
``dec()``, ``torch.save`` them. Both client modes of nnsight's `RemoteBackend` work:

- non-blocking: ``POST /request`` (multipart ``data`` + ``blob``) answers RECEIVED with a job id;
  ``GET /response/<id>`` answers the latest status (404 before the first); a COMPLETED status
  carries a URL, ``GET /result/<id>``, for the result bytes.
- blocking: ``GET /subscribe`` upgrades to a websocket (a minimal RFC 6455 server in the standard
  library) whose first message is ``{"session_id"}``; the statuses of requests carrying that
  session id are pushed to it as JSON text frames.

A failure while running becomes an ERROR status whose description is the server's traceback. The
server binds 127.0.0.1 on a free port, runs in daemon threads, and stops on `stop` (or exit)::

    with NdifServer({KEY: model}) as server:
        capture_acts(model, ids, site, remote=Remote(host=server.url, model_key=KEY))
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import linecache
import queue
import struct
import threading
import traceback
import uuid
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from nnsight import NNsight
from nnsight.schema.request import RequestModel
from nnsight.schema.response import ResponseModel, Status
from nnsight.tracing.tracer import _saves, dec, inc
from torch import nn

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WAIT_S = 30.0
"""Longest a websocket waits for its session's next status before giving up."""


class NdifServer:
    """Serve ``models`` (model key to torch module) on 127.0.0.1 until `stop`.

    Args:
        models: Model key (what clients send as ``model_key``) to the module to run.
    """

    def __init__(self, models: dict[str, nn.Module]) -> None:
        self.models = {key: NNsight(module) for key, module in models.items()}
        self.statuses: dict[str, ResponseModel] = {}
        self.results: dict[str, bytes] = {}
        self.sessions: dict[str, queue.Queue[ResponseModel]] = {}
        self.requests = 0
        self.lock = threading.Lock()
        self.jobs: queue.Queue[tuple[str, RequestModel, bytes] | None] = queue.Queue()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._threads = [
            threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}),
            threading.Thread(target=self._work),
        ]

    def __enter__(self) -> NdifServer:
        for thread in self._threads:
            thread.daemon = True
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving and join the threads (bounded)."""
        self.jobs.put(None)
        self.httpd.shutdown()
        self.httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _publish(self, request: RequestModel, response: ResponseModel) -> None:
        with self.lock:
            self.statuses[response.id] = response
            session = self.sessions.get(request.session_id)
        if session is not None:
            session.put(response)

    def _work(self) -> None:
        """Run queued jobs one at a time, as a model actor does."""
        while (job := self.jobs.get()) is not None:
            job_id, request, blob = job
            self._publish(request, ResponseModel(id=job_id, status=Status.RUNNING))
            try:
                data = self._execute(request, blob)
            except Exception:
                error = traceback.format_exc()
                self._publish(
                    request, ResponseModel(id=job_id, status=Status.ERROR, description=error)
                )
                continue
            with self.lock:
                self.results[job_id] = data
            done = ResponseModel(
                id=job_id, status=Status.COMPLETED, data=f"{self.url}/result/{job_id}"
            )
            self._publish(request, done)

    def _execute(self, request: RequestModel, blob: bytes) -> bytes:
        if request.model_key not in self.models:
            raise KeyError(f"This server does not host {request.model_key!r}.")
        model = self.models[request.model_key]
        persistent: dict[str, Any] = {"Interleaver": model.interleaver}
        for envoy in model.modules():
            persistent[f"Module:{envoy.path}"] = envoy._module
        # Deserializing registers the block's source in linecache under the client's file name;
        # a real server is another process, so put the client's entries back afterwards.
        cache = dict(linecache.cache)
        try:
            tracer = RequestModel.deserialize(blob, persistent, compress=request.compress)
        finally:
            linecache.cache.clear()
            linecache.cache.update(cache)
        inc()
        try:
            with torch.no_grad():
                tracer.execute(tracer.info.code)
            saves = _saves()
            result = {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in saves}
        finally:
            dec()
        buffer = io.BytesIO()
        torch.save(result, buffer)
        data = buffer.getvalue()
        if request.compress:
            import zstandard

            data = zstandard.ZstdCompressor(level=6).compress(data)
        return data


def _handler(server: NdifServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, code: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            if self.path != "/request":
                return self._send(404, b'{"detail": "not found"}')
            body = self.rfile.read(int(self.headers["Content-Length"]))
            head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
            parts = {
                part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                for part in BytesParser().parsebytes(head + body).get_payload()
            }
            request = RequestModel.model_validate_json(parts["data"])
            job_id = uuid.uuid4().hex
            with server.lock:
                server.requests += 1
            received = ResponseModel(id=job_id, status=Status.RECEIVED)
            server._publish(request, received)
            server.jobs.put((job_id, request, parts["blob"]))
            self._send(200, received.model_dump_json().encode())

        def do_GET(self) -> None:
            kind, _, key = self.path.strip("/").partition("/")
            if kind == "subscribe":
                return self._subscribe()
            with server.lock:
                status = server.statuses.get(key) if kind == "response" else None
                result = server.results.get(key) if kind == "result" else None
            if status is not None:
                return self._send(200, status.model_dump_json().encode())
            if result is not None:
                return self._send(200, result, "application/octet-stream")
            self._send(404, b'{"detail": "not found"}')

        def _subscribe(self) -> None:
            """Upgrade to a websocket and push this session's statuses until one is final."""
            accept = hashlib.sha1((self.headers["Sec-WebSocket-Key"] + WS_GUID).encode()).digest()
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", base64.b64encode(accept).decode())
            self.end_headers()
            session_id = uuid.uuid4().hex
            updates: queue.Queue[ResponseModel] = queue.Queue()
            with server.lock:
                server.sessions[session_id] = updates
            try:
                self._frame(json.dumps({"session_id": session_id}).encode())
                while True:
                    response = updates.get(timeout=WAIT_S)
                    self._frame(response.model_dump_json().encode())
                    if response.status in (Status.COMPLETED, Status.ERROR):
                        break
            except (queue.Empty, OSError):
                pass
            finally:
                with server.lock:
                    server.sessions.pop(session_id, None)
                self.close_connection = True

        def _frame(self, payload: bytes) -> None:
            """One unmasked, final text frame (RFC 6455 section 5.2)."""
            n = len(payload)
            if n < 126:
                header = struct.pack("!BB", 0x81, n)
            elif n < 1 << 16:
                header = struct.pack("!BBH", 0x81, 126, n)
            else:
                header = struct.pack("!BBQ", 0x81, 127, n)
            self.wfile.write(header + payload)
            self.wfile.flush()

    return Handler
