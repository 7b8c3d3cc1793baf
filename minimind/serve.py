"""An OpenAI-compatible chat server and a web chat page, on FastAPI + uvicorn.

    python -m minimind.serve full_sft --port 8998        # then open http://127.0.0.1:8998/
    curl http://127.0.0.1:8998/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hello"}], "stream": true}'

Endpoints:
    GET  /                      the web chat page (minimind/assets/chat.html)
    GET  /v1/models             the one model served (its capabilities: "thinking", "tools" for minimind-3's format)
    POST /v1/chat/completions   OpenAI's chat completion, whole or streamed as server-sent events ending with
                                `data: [DONE]`; minimind/openai_api.py lists the fields used, ignored and refused
    GET  /openapi.json          the API's schema

A model with minimind-3's chat format thinks when asked (chat_template_kwargs.enable_thinking, or reasoning_effort)
and calls the tools a request offers: the reply's thinking comes back as reasoning_content apart from the content,
its <tool_call> blocks as OpenAI tool_calls with finish_reason "tool_calls", streamed as deltas of each
(openai_api.ReplyShaper); the tool results come back as `tool` messages. tool_choice "required" or a named function
makes the reply a call: the server writes the call's opening for the model (ChatRequest.reply_start). A MiniMind2
model answers a 400 to tools and thinking.

Access (safe by default): with --api_key (or MINIMIND_API_KEY in the environment) /v1/ needs
`Authorization: Bearer KEY`. Browsers on other sites get no CORS access unless --cors_origin names their origin.
Bound to a loopback address (the default 127.0.0.1), the server only answers requests addressed to a loopback name
(localhost, 127.0.0.1, [::1]), so a web page cannot reach it by pointing its own DNS name at 127.0.0.1 (DNS
rebinding). The chat endpoint takes only `Content-Type: application/json`, which a page on another site cannot send
without asking (CORS preflight). The Server header is left out.

Limits: a body over --max_body_bytes is refused before it is read (Content-Length) or as soon as it passes the limit
(chunked); the whole request (body, queue, generation) must finish within --request_timeout seconds; at most
--max_queue requests wait for the model (more get 429 with Retry-After); a connection that has not sent a whole
request head within --keep_alive_timeout seconds, idle or between requests, is closed. Tokenising runs in a thread
that releases the GIL and generation in the model's own thread (minimind/scheduler.py), so the event loop keeps
answering; a reply stops being generated when its client goes away, streamed or not. Up to --max_batch requests
decode together, one batched forward per token on a KV cache of --max_batch x --max_context tokens (allocated at
start); a request joins the batch between tokens, and a conversation must fit --max_context with its reply.

Every failure is a JSON body in OpenAI's error shape, {"error": {"message", "type", "param", "code"}}: 400 a bad
request (the field named), 401 API key, 404 path, 405 method, 408 body too slow, 411 POST without a length, 413 body
too large, 415 not JSON, 429 queue full, 500 model failure, 503 time limit or shutting down. A failure after a
stream has started is a last event `data: {"error": ...}` without [DONE]. Malformed HTTP gets a JSON 400 too.
"""
import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Optional, Tuple

try:
    import h11
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as e:
    raise ImportError(f"minimind.serve needs FastAPI and uvicorn: pip install 'minimind-triton[serve]' ({e})") from e

from minimind.chat import add_model_args, add_sampling_args, number_at_least, parse_and_open
from minimind.generate import SamplingConfig
from minimind.openai_api import (ChatCompletion, ChatCompletionChunk, ChatRequest, ErrorResponse, ModelCard,
                                 ModelList, ReplyShaper, RequestError, Usage, stream_event_schema)
from minimind.scheduler import Closed, Job, QueueFull, Scheduler, TimeLimit

CHAT_PAGE = Path(__file__).resolve().parent / "assets" / "chat.html"
API_KEY_ENV = "MINIMIND_API_KEY"
BODYLESS_METHODS = ("GET", "HEAD", "OPTIONS", "DELETE")


@dataclass
class ServeConfig:
    model_name: str
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # the defaults a request's fields override
    seed: Optional[int] = None  # the seed of requests that bring none (None: unseeded)
    max_tokens_cap: int = 2048
    api_key: Optional[str] = None
    cors_origins: Tuple[str, ...] = ()  # "*" allows every origin
    loopback_only: bool = True  # answer only requests addressed to a loopback name
    max_body_bytes: int = 1 << 20
    max_queue: int = 64
    max_batch: int = 16  # requests generated together
    max_context: int = 4096  # tokens of one request, prompt and reply (at most the model's context)
    request_timeout: float = 300.0
    keep_alive_timeout: float = 5.0


class APIError(Exception):
    """A failure answered as OpenAI's error object. close: end the connection after the answer (its request body
    was not read, so the next request's start is unknown)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {}, **({"Connection": "close"} if close else {}))

    def body(self) -> dict:
        kind = ("server_error" if self.status >= 500 else "rate_limit_error" if self.status == 429
                else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


# ---------------------------------------------------------------- HTTP: framing, timeouts, access

class LingeringTransport:
    """An asyncio transport whose close(), while the client may still be sending (`client_sending()`), first ends
    the writing side (FIN after the last response) and lets the client finish for up to `linger_s` seconds,
    discarding what it sends, before it really closes. Closing a socket with unread bytes in it makes the kernel
    reset the connection, and a client still sending a body (one answered 413, say) then loses the answer it was
    about to read."""

    def __init__(self, transport, loop, linger_s: float, client_sending):
        self._transport, self._loop, self._linger_s, self._client_sending = transport, loop, linger_s, client_sending
        self.lingering = False

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def is_closing(self):
        return self.lingering or self._transport.is_closing()

    def close(self):
        if (self.lingering or self._transport.is_closing() or not self._transport.can_write_eof()
                or not self._client_sending()):
            self._transport.close()
            return
        self.lingering = True
        self._transport.write_eof()
        self._transport.resume_reading()  # flow control may have paused it
        self._loop.call_later(self._linger_s, self._transport.close)


class HTTPProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 (h11) with three changes. A request h11 cannot parse (a bad request line or header,
    conflicting Content-Length headers, a missing Host, an unfinished head over 16 KiB) gets OpenAI's JSON error
    instead of uvicorn's plain text. The keep-alive timer also runs until a whole request head has arrived: uvicorn
    never closes a connection that sends nothing, or its head one byte at a time; here it closes after
    keep_alive_timeout seconds (a partial head gets a 408). And connections close lingering (LingeringTransport,
    for up to keep_alive_timeout seconds), so an error answered before a body was read reaches its client."""

    def connection_made(self, transport):
        transport = LingeringTransport(transport, self.loop, self.timeout_keep_alive, self._client_sending)
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes):
        if self.transport.lingering:
            return  # the rest of a request that was already answered
        timer, self.timeout_keep_alive_task = self.timeout_keep_alive_task, None  # bytes alone do not reset it
        super().data_received(data)
        if timer is not None:
            if self.conn.their_state is h11.IDLE and self.timeout_keep_alive_task is None:
                self.timeout_keep_alive_task = timer  # still no whole request head
            else:
                timer.cancel()

    def _client_sending(self) -> bool:
        """Whether the client may be in the middle of a request: its body, a head cut short, or bytes h11 refused."""
        state = self.conn.their_state
        return state in (h11.SEND_BODY, h11.ERROR) or (state is h11.IDLE and bool(self.conn.trailing_data[0]))

    def timeout_keep_alive_handler(self):
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0] and not self.transport.is_closing():
            self._refuse(APIError(408, f"the request head did not arrive within {self.timeout_keep_alive} s"))
        else:
            super().timeout_keep_alive_handler()

    def send_400_response(self, msg: str):
        self._refuse(APIError(400, "malformed HTTP request: h11 could not parse it (a bad request line or header, "
                                   "conflicting Content-Length headers, no Host header, or a head over 16 KiB)"))

    def _refuse(self, error: APIError):
        """Answer `error` and close, whatever h11's state; an application still at this request sees the client
        gone from now on."""
        cycle = self.cycle if self.cycle is not None and not self.cycle.response_complete else None
        if cycle is not None:
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()  # an answer is already on its way: it cannot be replaced
                return
        body = json.dumps(error.body()).encode()
        head = (f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
        self.transport.write(head.encode() + body)
        self.transport.close()


def is_loopback_host(host: str) -> bool:
    """Whether a Host header (or a --host address) names this machine's loopback interface."""
    name = host.strip().lower()
    if name.startswith("["):  # [::1]:8998
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:  # 127.0.0.1:8998, localhost:8998
        name = name.partition(":")[0]
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: *.localhost is loopback
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Gate:
    """The checks every request passes before routing, in this order: its Host (when serving loopback only), its
    framing (no Content-Length beside Transfer-Encoding, a length on a POST), CORS (a preflight from an allowed
    origin is answered here), the API key on /v1/, and the body size by Content-Length. A refusal is an APIError
    answered here; it closes the connection when a body is left unread. A GET (HEAD, OPTIONS, DELETE) with a body
    is answered as usual, then the connection closes: its body is never read, let alone as a request."""

    def __init__(self, app, cfg: ServeConfig):
        self.app, self.cfg = app, cfg

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        cors = origin is not None and ("*" in self.cfg.cors_origins or origin in self.cfg.cors_origins)
        extra = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")] if cors else []
        if scope["method"] in BODYLESS_METHODS and has_body(headers):
            extra.append((b"connection", b"close"))

        async def send_with_extra(message):
            if message["type"] == "http.response.start" and extra:
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)
        try:
            self._check(scope, headers, cors)
        except APIError as e:
            return await e.response()(scope, receive, send_with_extra)
        if cors and scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            return await Response(status_code=204, headers={
                "Access-Control-Allow-Methods": "GET, POST", "Access-Control-Max-Age": "600",
                "Access-Control-Allow-Headers": "Authorization, Content-Type"})(scope, receive, send_with_extra)
        await self.app(scope, receive, send_with_extra)

    def _check(self, scope, headers: Headers, cors: bool):
        host, method = headers.get("host", ""), scope["method"]
        if self.cfg.loopback_only and not is_loopback_host(host):
            raise APIError(400, f"Host {host!r} is not a loopback name: this server is bound to a loopback address "
                                "and answers only requests addressed to localhost, 127.0.0.1 or [::1] (DNS-rebinding "
                                "protection); serve on --host 0.0.0.0 to be reached by other names", close=True)
        chunked, length = "transfer-encoding" in headers, headers.get("content-length")
        if chunked and length is not None:
            raise APIError(400, "a request may not have both Content-Length and Transfer-Encoding", close=True)
        if method == "POST" and not chunked and length is None:
            raise APIError(411, "a POST needs a Content-Length header (or Transfer-Encoding: chunked)", close=True)
        if cors and method == "OPTIONS":
            return  # a preflight carries no credentials
        if self.cfg.api_key is not None and scope["path"].startswith("/v1/"):
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.cfg.api_key.encode()):
                raise APIError(401, "a valid API key is needed: send the header 'Authorization: Bearer KEY'"
                               if key else "no API key: send the header 'Authorization: Bearer KEY'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
                               close=has_body(headers))
        if length is not None and int(length) > self.cfg.max_body_bytes:
            raise APIError(413, f"the body is {int(length)} bytes; this server takes at most "
                                f"{self.cfg.max_body_bytes} (--max_body_bytes)", close=True)


def has_body(headers: Headers) -> bool:
    return "transfer-encoding" in headers or headers.get("content-length", "0") != "0"


# ---------------------------------------------------------------- the application

def build_app(scheduler: Scheduler, cfg: ServeConfig) -> FastAPI:
    """The FastAPI application serving `scheduler`'s model (the page, /v1/models, /v1/chat/completions) behind
    the Gate."""
    tokenizer, context = scheduler.tokenizer, scheduler.max_context
    capabilities = [c for c, able in (("thinking", tokenizer.supports_thinking), ("tools", tokenizer.supports_tools))
                    if able]
    errors = {status: {"model": ErrorResponse} for status in (400, 401, 408, 411, 413, 415, 429, 500, 503)}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()
    app = FastAPI(title="MiniMind", version="1", docs_url=None, redoc_url=None, responses=errors, lifespan=lifespan)
    app.add_middleware(Gate, cfg=cfg)
    request_body, stream_event, schemas = documented_schemas()
    default_openapi = app.openapi

    def openapi():
        if app.openapi_schema is None:
            default_openapi().setdefault("components", {}).setdefault("schemas", {}).update(schemas)
        return app.openapi_schema
    app.openapi = openapi

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(QueueFull)
    @app.exception_handler(Closed)
    async def scheduler_refused(request, e: Exception):
        return job_error(e).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # routing's 404 and 405
        message = {404: f"no such path: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return APIError(e.status_code, message, headers=e.headers).response()

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return APIError(500, f"internal error: {type(e).__name__}: {e}").response()

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page():
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"), headers={
            "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[ModelCard(id=cfg.model_name, capabilities=capabilities)])

    def encode(messages, options, reply_start):  # encode_batch releases the GIL (encode holds it: a 1 MB prompt
        # froze the server); reply_start is encoded with the prompt, as the model saw such text in training
        return tokenizer.encode_batch([tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                     **options) + reply_start])[0]

    @app.post("/v1/chat/completions", response_model=ChatCompletion, openapi_extra=request_body, responses={
        200: {"content": {"text/event-stream": {"schema": stream_event}},
              "description": "the completion, or with stream: true its chunks as server-sent events"}})
    async def chat_completions(request: Request):
        deadline = time.monotonic() + cfg.request_timeout
        if request.headers.get("content-type", "").partition(";")[0].strip().lower() != "application/json":
            raise APIError(415, "send the request as JSON with 'Content-Type: application/json'", close=True)
        try:
            req = ChatRequest.parse(await read_body(request, cfg.max_body_bytes, deadline))
            messages = req.conversation()
            options = req.template_options(tokenizer.supports_tools, tokenizer.supports_thinking)
            reply_start = req.reply_start(options["enable_thinking"])
        except RequestError as e:
            raise APIError(400, str(e), e.param) from None
        scheduler.check_room()  # refuse before tokenising when the queue is full
        prompt = await run_in_threadpool(encode, messages, options, reply_start)
        if len(prompt) >= context:
            raise APIError(400, f"the conversation is {len(prompt)} tokens; the context is {context} (--max_context, "
                                f"at most the model's {scheduler.model.config.max_position_embeddings}): send fewer "
                                "or shorter messages", "messages")
        seed = req.seed if req.seed is not None else cfg.seed
        job = Job(prompt, req.sampling(cfg.sampling, cfg.max_tokens_cap), seed, req.stop_sequences(), deadline)
        scheduler.submit(job)
        reply = dict(id=f"chatcmpl-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=cfg.model_name)
        shaper = ReplyShaper(req, tokenizer.supports_thinking, options["enable_thinking"], reply_start)
        if req.stream:
            return StreamingResponse(stream_events(job, reply, req.include_usage(), shaper),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text = await answer_unless_gone(job, request)
        if text is None:
            return Response(status_code=204)  # nobody is listening
        return ChatCompletion(**reply, usage=usage(job), choices=[
            {"message": shaper.message(text), "finish_reason": shaper.finish_reason(job.finish_reason)}])

    return app


def documented_schemas():
    """(openapi_extra of the chat endpoint, the schema of one event of its stream, the component schemas they
    refer to). Given by hand: the request is parsed here, not by FastAPI, and the stream is no response model."""
    ref, schemas = "#/components/schemas/{model}", {}
    for model in (ChatRequest, ChatCompletionChunk):
        schema = model.model_json_schema(ref_template=ref)
        schemas.update(schema.pop("$defs", {}), **{model.__name__: schema})
    request = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": ref.format(model="ChatRequest")}}}}}
    return request, stream_event_schema(lambda model: {"$ref": ref.format(model=model.__name__)}), schemas


async def read_body(request: Request, limit: int, deadline: float) -> bytes:
    """The request body, at most `limit` bytes (413 past it, chunked bodies included), by the deadline (408)."""
    body = bytearray()

    async def read():
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise APIError(413, f"the body is over {limit} bytes (--max_body_bytes)", close=True)
    try:
        await asyncio.wait_for(read(), max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise APIError(408, "the request body did not arrive within the time limit (--request_timeout)",
                       close=True) from None
    except ClientDisconnect:
        raise APIError(400, "the client went away before sending its body", close=True) from None
    return bytes(body)


def job_error(e: Exception) -> APIError:
    if isinstance(e, TimeLimit):
        return APIError(503, f"{e} (--request_timeout)", code="timeout")
    if isinstance(e, Closed):
        return APIError(503, str(e), code="shutting_down")
    if isinstance(e, QueueFull):
        return APIError(429, f"{e} (--max_queue); retry later", code="queue_full",
                        headers={"Retry-After": str(e.retry_after)})
    return APIError(500, f"generation failed: {type(e).__name__}: {e}")


def usage(job: Job) -> Usage:
    prompt, completion = len(job.prompt_ids), len(job.reply_ids)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def answer_unless_gone(job: Job, request: Request) -> Optional[str]:
    """The whole reply; None (and the job cancelled) if the client disconnects first."""
    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass
    text, watch = asyncio.ensure_future(job.text()), asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({text, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not text.done():
            job.cancel()
            text.cancel()
    if text not in done:
        return None
    try:
        return text.result()
    except Exception as e:
        raise job_error(e) from None


async def stream_events(job: Job, reply: dict, include_usage: bool, shaper: ReplyShaper):
    """The reply as OpenAI's server-sent chunks: the role, the deltas (content, reasoning_content, tool calls) as
    the text comes, the finish reason, the usage (when stream_options.include_usage asks, in a chunk of its own),
    [DONE]. Leaving early cancels the job."""
    extra = {"usage": None} if include_usage else {}

    def event(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def chunk(delta, finish_reason=None):
        return event({**reply, "object": "chat.completion.chunk", **extra,
                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for piece in job.pieces():
            for delta in shaper.feed(piece):
                yield chunk(delta)
        for delta in shaper.close():
            yield chunk(delta)
    except Exception as e:  # the status line is out: the error is the last event
        yield event(job_error(e).body())
        return
    finally:
        job.cancel()
    yield chunk({}, shaper.finish_reason(job.finish_reason))
    if include_usage:
        yield event({**reply, "object": "chat.completion.chunk", "choices": [], "usage": usage(job).model_dump()})
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------- running it

def make_server(scheduler: Scheduler, cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8998,
                verbose: bool = False):
    """(uvicorn.Server, its listening socket): run it with `server.run(sockets=[sock])` (it returns after
    `server.should_exit = True`). The socket is bound and listening already, so port 0 has its number."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    config = uvicorn.Config(build_app(scheduler, cfg), http=HTTPProtocol, ws="none", proxy_headers=False,
                            lifespan="on", server_header=False,
                            timeout_keep_alive=cfg.keep_alive_timeout, timeout_graceful_shutdown=5,
                            log_level="info" if verbose else "warning", access_log=verbose)
    return uvicorn.Server(config), sock


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minimind.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_sampling_args(p)
    d, positive = ServeConfig(""), number_at_least(float, 0, inclusive=False)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines (then set --api_key)")
    p.add_argument("--port", type=int, default=8998, help="TCP port (default %(default)s)")
    p.add_argument("--model_name", default=None, help="the model id clients see (default: the weight file's name)")
    p.add_argument("--max_tokens_cap", type=number_at_least(int, 1), default=d.max_tokens_cap,
                   help="the most tokens one reply may have")
    p.add_argument("--api_key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/ (default: ${API_KEY_ENV} if set; the "
                        "environment keeps the key out of the process list)")
    p.add_argument("--cors_origin", action="append", default=[],
                   help="let web pages from this origin (https://app.example:3000, or * for any) call the API from "
                        "a browser; repeat for several (default: none)")
    p.add_argument("--max_body_bytes", type=number_at_least(int, 1), default=d.max_body_bytes,
                   help="the largest request body (a full 32k-token conversation is a few hundred KB)")
    p.add_argument("--max_queue", type=number_at_least(int, 0), default=d.max_queue,
                   help="requests that may wait for the model; more are answered 429 with Retry-After")
    p.add_argument("--max_batch", type=number_at_least(int, 1), default=d.max_batch,
                   help="requests generated together, one batched forward per token (more wait in the queue)")
    p.add_argument("--max_context", type=number_at_least(int, 2), default=d.max_context,
                   help="tokens one request may hold, conversation and reply (at most the model's context; the KV "
                        "cache holds max_batch x max_context tokens from the start)")
    p.add_argument("--request_timeout", type=positive, default=d.request_timeout,
                   help="seconds a request may take in all: body, queue and generation (then 408 or 503)")
    p.add_argument("--keep_alive_timeout", type=positive, default=d.keep_alive_timeout,
                   help="seconds a connection may stay open without sending a whole request head")
    p.add_argument("--verbose", action="store_true", help="log every request")
    args, model, tokenizer, path, defaults = parse_and_open(p, argv)
    cfg = ServeConfig(model_name=args.model_name or path.stem, sampling=defaults, seed=args.seed,
                      max_tokens_cap=args.max_tokens_cap, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                      cors_origins=tuple(args.cors_origin), loopback_only=is_loopback_host(args.host),
                      max_body_bytes=args.max_body_bytes, max_queue=args.max_queue, max_batch=args.max_batch,
                      max_context=args.max_context, request_timeout=args.request_timeout,
                      keep_alive_timeout=args.keep_alive_timeout)
    scheduler = Scheduler(model, tokenizer, cfg.max_queue, cfg.max_batch, cfg.max_context)
    try:
        server, sock = make_server(scheduler, cfg, args.host, args.port, args.verbose)
    except OSError as e:
        scheduler.close()
        p.error(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"serving {path} as {cfg.model_name!r} ({cfg.max_batch} requests at a time of up to {scheduler.max_context} "
          f"tokens, KV cache {scheduler.kv_cache_bytes() / 2 ** 20:.0f} MiB): web chat http://{host}:{port}/ , "
          f"API base http://{host}:{port}/v1" + (" (API key required)" if cfg.api_key else ""), flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
