"""An OpenAI-compatible chat server and a web chat page, on the Python standard library alone.

    python -m minimind.serve full_sft --port 8998        # then open http://127.0.0.1:8998/
    curl http://127.0.0.1:8998/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hello"}], "stream": true}'

Endpoints:
    GET  /                       the web chat page (minimind/assets/chat.html), which talks to the endpoint below
    GET  /v1/models              the one model served
    POST /v1/chat/completions    messages, temperature, top_p, top_k, max_tokens (or max_completion_tokens),
                                 repetition_penalty, seed, stream (server-sent events, ending with `data: [DONE]`)

Replies follow OpenAI's chat-completion objects (id, object, created, model, choices with message or delta and
finish_reason "stop" | "length", usage), so third-party chat UIs and the `openai` client work with a base URL of
http://HOST:PORT/v1. Bad requests get status 400 and {"error": {"message", "type", "param"}} naming the field
(a conversation longer than the model's context included); a failure inside the model, 500 with the reason.
One model answers one request at a time (a lock); requests wait their turn. CORS is open, for browser clients.
"""
import argparse
import json
import math
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from minimind.chat import add_model_args, add_sampling_args, parse_and_open
from minimind.generate import SamplingConfig, stream_text

CHAT_PAGE = Path(__file__).resolve().parent / "assets" / "chat.html"
ROLES = ("system", "user", "assistant")
MAX_BODY_BYTES = 8 << 20  # a conversation that fills the context is a few hundred KB


class RequestError(ValueError):
    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param


def parse_request(body: dict, defaults: SamplingConfig, max_tokens_cap: int):
    """A chat-completion request -> (messages, SamplingConfig, seed, stream). Raises RequestError naming the field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content}", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {list(ROLES)}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", f"messages[{i}].content")
        if m["role"] == "system" and i > 0:
            raise RequestError(f"messages[{i}]: a system message may only come first", f"messages[{i}].role")
        clean.append({"role": m["role"], "content": content})
    if clean[-1]["role"] != "user":
        raise RequestError("the last message must be the user's", f"messages[{len(clean) - 1}].role")

    def number(name, kind, default):
        value = body.get(name)
        if value is None:
            return default
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or (kind is int and value != int(value))):  # (Python's json reads NaN and Infinity)
            raise RequestError(f"'{name}' must be a{'n integer' if kind is int else ' finite number'}", name)
        return kind(value)

    max_tokens = number("max_completion_tokens", int, number("max_tokens", int, defaults.max_new_tokens))
    if max_tokens < 1:
        raise RequestError("'max_tokens' must be at least 1", "max_tokens")
    fields = dict(max_new_tokens=min(max_tokens, max_tokens_cap),
                  temperature=number("temperature", float, defaults.temperature),
                  top_p=number("top_p", float, defaults.top_p),
                  top_k=number("top_k", int, defaults.top_k),
                  repetition_penalty=number("repetition_penalty", float, defaults.repetition_penalty))
    try:
        cfg = SamplingConfig(**fields)
    except ValueError as e:
        raise RequestError(str(e), str(e).split()[0]) from None
    if body.get("n", 1) != 1:
        raise RequestError("only n = 1 is supported", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", "stream")
    seed = number("seed", int, None)
    if seed is not None and not -2 ** 63 <= seed < 2 ** 64:
        raise RequestError("'seed' must fit in 64 bits", "seed")
    return clean, cfg, seed, stream


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, model, tokenizer, model_name, defaults: SamplingConfig, max_tokens_cap=2048,
                 verbose=False):
        super().__init__(address, ChatHandler)
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.defaults, self.max_tokens_cap, self.verbose = defaults, max_tokens_cap, verbose
        self.lock = threading.Lock()

    def generator(self, seed):
        if seed is None:
            return None
        device = next(self.model.parameters()).device
        return torch.Generator(device=device).manual_seed(seed)


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # one line per request, no noise in tests
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _headers(self, status, content_type, length=None, close=False):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Access-Control-Allow-Origin", "*")
        if length is not None:
            self.send_header("Content-Length", str(length))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()

    def _send_json(self, status, obj, close=False):
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self._headers(status, "application/json; charset=utf-8", len(data), close)
        self.wfile.write(data)

    def _error(self, status, message, param=None, kind="invalid_request_error", close=False):
        self._send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}}, close)

    def do_OPTIONS(self):
        self.send_response(HTTPStatus.NO_CONTENT)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Content-Type, Authorization")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        if self.path in ("/", "/index.html"):
            page = CHAT_PAGE.read_bytes()
            self._headers(HTTPStatus.OK, "text/html; charset=utf-8", len(page))
            self.wfile.write(page)
        elif self.path == "/favicon.ico":
            self.send_response(HTTPStatus.NO_CONTENT)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/v1/models":
            self._send_json(HTTPStatus.OK, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "minimind"}]})
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such path: GET {self.path}", kind="not_found")

    def _read_body(self):
        """The request body (Content-Length bytes; none without the header), or None after answering 400 and
        closing the connection when the length is unusable (the next request's start could not be found)."""
        try:
            length = -1 if "Transfer-Encoding" in self.headers else int(self.headers.get("Content-Length", 0))
        except ValueError:
            length = -1
        if length < 0:
            self._error(HTTPStatus.BAD_REQUEST, "send the body with a valid Content-Length (chunked transfer "
                        "encoding is not supported)", close=True)
            return None
        if length > MAX_BODY_BYTES:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is {length} bytes; at most {MAX_BODY_BYTES} "
                        "are read", close=True)
            return None
        return self.rfile.read(length)

    def do_POST(self):
        raw = self._read_body()  # read even for a wrong path: on a kept-alive connection the next request follows
        if raw is None:
            return
        if self.path != "/v1/chat/completions":
            self._error(HTTPStatus.NOT_FOUND, f"no such path: POST {self.path}", kind="not_found")
            return
        try:
            body = json.loads(raw.decode("utf-8") or "null")
            messages, cfg, seed, stream = parse_request(body, self.server.defaults, self.server.max_tokens_cap)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self._error(HTTPStatus.BAD_REQUEST, f"the request body is not valid JSON: {e}")
            return
        except RequestError as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e), e.param)
            return
        srv, info = self.server, {}
        prompt = srv.tokenizer.encode(srv.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        context = srv.model.config.max_position_embeddings
        if len(prompt) >= context:
            self._error(HTTPStatus.BAD_REQUEST, f"the conversation is {len(prompt)} tokens; the model's context is "
                        f"{context}: send fewer or shorter messages", "messages")
            return
        reply = dict(id=f"chatcmpl-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=srv.model_name)
        with srv.lock:
            pieces = stream_text(srv.model, srv.tokenizer, prompt, cfg, srv.generator(seed), info)
            try:
                if stream:
                    self._stream(reply, pieces, info)
                else:
                    text = "".join(pieces)
                    self._send_json(HTTPStatus.OK, {**reply, "object": "chat.completion", "choices": [{
                        "index": 0, "message": {"role": "assistant", "content": text},
                        "finish_reason": info["finish_reason"]}], "usage": _usage(info)})
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client went away: stop generating
            except Exception as e:  # a failure inside the model: say so rather than drop the connection
                if stream:
                    raise  # the headers are out; the stream ends without [DONE]
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed: {type(e).__name__}: {e}",
                            kind="server_error", close=True)
            finally:
                pieces.close()  # inside the lock: the generator's cleanup touches the shared model

    def _stream(self, reply, pieces, info):
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Connection", "close")  # the stream's end is the connection's end
        self.end_headers()
        self.close_connection = True

        def event(delta, finish_reason=None, **extra):
            chunk = {**reply, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
            self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode("utf-8"))
            self.wfile.flush()

        event({"role": "assistant", "content": ""})
        for piece in pieces:
            event({"content": piece})
        event({}, info["finish_reason"], usage=_usage(info))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def _usage(info):
    return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
            "total_tokens": info["prompt_tokens"] + info["completion_tokens"]}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minimind.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    p.add_argument("--port", type=int, default=8998, help="TCP port (default %(default)s)")
    p.add_argument("--model_name", default=None, help="the model id clients see (default: the weight file's name)")
    p.add_argument("--max_tokens_cap", type=int, default=2048, help="the most tokens one reply may have")
    p.add_argument("--verbose", action="store_true", help="log every request")
    args, model, tokenizer, path, defaults = parse_and_open(p, argv)
    server = ChatServer((args.host, args.port), model, tokenizer, args.model_name or path.stem, defaults,
                        args.max_tokens_cap, args.verbose)
    host, port = server.server_address[:2]
    print(f"serving {path} as {server.model_name!r}: web chat http://{host}:{port}/ , "
          f"API base http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
