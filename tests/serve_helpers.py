"""The real server on loopback for the serve tests: uvicorn in a thread on a free port, a tiny model, and small
clients (JSON over http.client, raw sockets for what a well-behaved client never sends)."""
import contextlib
import http.client
import io
import json
import socket
import threading
import time
from dataclasses import dataclass

from minimind.generate import SamplingConfig
from minimind.scheduler import Scheduler
from minimind.serve import ServeConfig, make_server
from minimind.tokenizer import load_tokenizer
from tests.test_chat import tiny

QUESTION = [{"role": "user", "content": "Who is Ada? 你好"}]


@dataclass
class Running:
    url: str
    port: int
    scheduler: Scheduler
    model: object
    tokenizer: object


@contextlib.contextmanager
def running_server(model=None, tokenizer=None, **cfg):
    """A server for `model` (default: tiny()) with ServeConfig fields `cfg` (default: 8-token replies)."""
    model = model if model is not None else tiny()
    tokenizer = tokenizer or load_tokenizer()
    config = ServeConfig(**{"model_name": "tiny", "sampling": SamplingConfig(max_new_tokens=8), **cfg})
    scheduler = Scheduler(model, tokenizer, config.max_queue, config.max_batch, config.max_context)
    server, sock = make_server(scheduler, config, "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = sock.getsockname()[1]
    try:
        yield Running(f"http://127.0.0.1:{port}", port, scheduler, model, tokenizer)
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"


def slow_down(model, seconds):
    """Make every forward pass of `model` take `seconds` longer; returns the list of their start times. (The
    transformer body's: generation runs it and applies lm_head itself.)"""
    calls, forward = [], model.model.forward

    def slowed(*args, **kwargs):
        calls.append(time.monotonic())
        time.sleep(seconds)
        return forward(*args, **kwargs)
    model.model.forward = slowed
    return calls


def forward_shapes(model, gate=None):
    """Record the input_ids shape (rows, tokens) of every forward of `model`'s transformer body: a decode step is
    (running rows, 1), a prefill (joining rows, longest prompt). With a threading.Event `gate`, each forward first
    waits (up to 60 s) for it to be set."""
    shapes, forward = [], model.model.forward

    def recorded(input_ids, *args, **kwargs):
        if gate is not None:
            gate.wait(60)
        shapes.append(tuple(input_ids.shape))
        return forward(input_ids, *args, **kwargs)
    model.model.forward = recorded
    return shapes


def request(port, method, path, body=None, headers=None, timeout=30):
    """(status, headers, body bytes) over a fresh connection; a dict body is sent as JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body, ensure_ascii=False).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def post_chat(port, body, headers=None, timeout=60):
    """(status, headers, parsed JSON body) of a chat request."""
    status, headers, data = request(port, "POST", "/v1/chat/completions", body, headers, timeout)
    return status, headers, json.loads(data) if headers.get("content-type", "").startswith("application/json") else data


def events(body: bytes):
    """The data payloads of a server-sent event stream, JSON-decoded except the final [DONE]."""
    out = []
    for block in body.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def raw_exchange(port, data: bytes, timeout=10.0, pause_after=None):
    """Send `data` as is on a fresh socket (`pause_after`: seconds to wait before half-closing), then read until
    the server closes or `timeout` passes. Returns everything received."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if pause_after:
            time.sleep(pause_after)
        received, deadline = b"", time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            received += chunk
        return received


def parse_responses(data: bytes):
    """Every HTTP response in `data`, in order: [(status, headers (lower-case names), body bytes)]."""
    class Unclosable(io.BytesIO):  # HTTPResponse closes its file after a `Connection: close` response
        def close(self):
            pass

    class Sock:
        def makefile(self, mode):
            return stream
    out, stream = [], Unclosable(data)
    while stream.tell() < len(data):
        r = http.client.HTTPResponse(Sock())
        r.begin()
        out.append((r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()))
    return out


def assert_json_error(status, headers, body, want_status, param=None):
    """An OpenAI-shaped error with the status wanted (and the param, when given)."""
    assert status == want_status, (status, body)
    assert headers["content-type"].startswith("application/json"), headers
    error = (json.loads(body) if isinstance(body, (bytes, str)) else body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert error["type"] == ("server_error" if status >= 500 else "rate_limit_error" if status == 429
                             else "invalid_request_error"), error
    if param is not None:
        assert error["param"] == param, error
    return error
