"""The OpenAI-compatible server (minimind.serve) as clients see it: the official `openai` client, streamed and not,
gets the library's replies; OpenAI's fields (seed, stop, n, stream_options, max_completion_tokens, unknown ones)
behave as documented; access control (API key, CORS, Host); the queue, the time limit and departing clients; 16
concurrent clients; the command line. The server runs for real on loopback (tests/serve_helpers.py)."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
import torch

from minimind.generate import chat
from tests.serve_helpers import (QUESTION, assert_json_error, events, forward_shapes, post_chat, request,
                                 running_server, slow_down)
from tests.test_chat import save_fp16, tiny
from tests.train_helpers import ROOT


@pytest.fixture(scope="module")
def server():
    with running_server() as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_openai_client_gets_the_librarys_reply(server, client):
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=6)
    want = chat(server.model, server.tokenizer, QUESTION, max_new_tokens=6, temperature=0.0)
    assert reply.object == "chat.completion" and reply.model == "tiny" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.content == want and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    prompt = len(server.tokenizer.encode(server.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        prompt, 6, prompt + 6)


def test_streamed_equals_whole_and_usage_comes_only_when_asked(server, client):
    whole = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=7)
    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=7,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.usage is None and c.id == chunks[0].id for c in chunks)
    # raw: without stream_options no chunk carries a usage key at all
    status, headers, body = request(server.port, "POST", "/v1/chat/completions",
                                    {"messages": QUESTION, "temperature": 0, "max_tokens": 7, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    data = events(body)
    assert data[-1] == "[DONE]" and not any("usage" in d for d in data[:-1])

    asked = list(client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=7,
                                                stream=True, stream_options={"include_usage": True}))
    assert asked[-1].choices == [] and asked[-1].usage.completion_tokens == 7
    assert asked[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.usage is None for c in asked[:-1]) and asked[-2].choices[0].finish_reason == "length"


def test_a_request_seed_makes_sampling_repeatable(server, client):
    def ask(seed):
        return client.chat.completions.create(model="tiny", messages=QUESTION, temperature=1.0, top_p=1.0,
                                              max_tokens=8, seed=seed).choices[0].message.content
    first = ask(7)
    assert ask(7) == first
    # the chat command's --seed 7: a generator seeded with 7
    assert first == chat(server.model, server.tokenizer, QUESTION, generator=torch.Generator().manual_seed(7),
                         temperature=1.0, top_p=1.0, max_new_tokens=8)
    assert {ask(s) for s in (1, 2, 3)} - {first}  # other seeds sample other replies


def test_the_servers_seed_is_the_default_seed():
    with running_server(seed=7) as srv:
        body = {"messages": QUESTION, "temperature": 1.0, "top_p": 1.0, "max_tokens": 8}
        replies = [post_chat(srv.port, b)[2]["choices"][0]["message"]["content"]
                   for b in (body, body, {**body, "seed": 7}, {**body, "seed": 8})]
    assert replies[0] == replies[1] == replies[2]  # no seed: the server's 7
    assert replies[3] != replies[0]


def test_stop_sequences_end_the_reply_streamed_or_not(server, client):
    full = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=8)
    text = full.choices[0].message.content
    cut = len(text) // 2
    stop = text[cut:cut + 3]
    want = text[:text.find(stop)]
    for stops in (stop, [stop, "never in the reply"]):
        reply = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=8,
                                               stop=stops)
        assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (want, "stop")
        chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=8,
                                                     stop=stops, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason == "stop"
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=8,
                                           stop=["never in the reply"])
    assert reply.choices[0].message.content == text and reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages[1].role"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"},
                   {"role": "user", "content": "hi"}]}, "messages[1].role"),
    ({"messages": QUESTION, "temperature": -1}, "temperature"),
    ({"messages": QUESTION, "temperature": 2.5}, "temperature"),
    ({"messages": QUESTION, "top_p": 1.5}, "top_p"),
    ({"messages": QUESTION, "max_tokens": "many"}, "max_tokens"),
    ({"messages": QUESTION, "max_tokens": 0}, "max_tokens"),
    ({"messages": QUESTION, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": QUESTION, "max_completion_tokens": 2.5}, "max_completion_tokens"),
    ({"messages": QUESTION, "max_completion_tokens": True}, "max_completion_tokens"),
    ({"messages": QUESTION, "stream": "yes"}, "stream"),
    ({"messages": QUESTION, "stream": True, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
    ({"messages": QUESTION, "n": 2}, "n"),
    ({"messages": QUESTION, "seed": 1.5}, "seed"),
    ({"messages": QUESTION, "stop": ""}, "stop"),
    ({"messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": QUESTION, "stop": [3]}, "stop[0]"),
    ({"messages": QUESTION, "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"messages": QUESTION, "logprobs": True}, "logprobs"),
    ({"messages": QUESTION, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),  # MiniMind2's
    ({"messages": QUESTION, "tool_choice": "required"}, "tool_choice"),
    ({"messages": QUESTION, "reasoning_effort": "low"}, "reasoning_effort"),  # MiniMind2's format: no thinking
    ({"messages": QUESTION, "functions": [{"name": "f"}]}, "functions"),
    ({"messages": QUESTION, "temprature": 0.5}, "temprature"),  # a typo is not silently ignored
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages[0].tool_calls"),
])
def test_bad_requests_are_400s_that_name_the_field(server, body, param):
    status, headers, reply = post_chat(server.port, body)
    error = assert_json_error(status, headers, reply, 400, param)
    assert param.split("[")[0].split(".")[0] in error["message"]


def test_refused_fields_say_why_and_harmless_ones_are_accepted(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=QUESTION, top_logprobs=2)
    assert "log-probabilities are not returned" in e.value.message
    status, _, reply = post_chat(server.port, {"messages": QUESTION, "temprature": 0.5})
    assert "unrecognized request argument supplied: 'temprature'" in reply["error"]["message"]
    reply = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        max_completion_tokens=3, n=1, user="u1", metadata={"k": "v"}, store=False, frequency_penalty=0,
        presence_penalty=0, logprobs=False, response_format={"type": "text"}, parallel_tool_calls=False)
    assert reply.usage.completion_tokens <= 3 and reply.model == "tiny"
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Who is "}, {"type": "text", "text": "Ada? 你好"}]}], temperature=0, max_tokens=5)
    assert reply.choices[0].message.content == chat(server.model, server.tokenizer, QUESTION, max_new_tokens=5,
                                                    temperature=0.0)


def test_max_completion_tokens_wins_and_the_cap_holds(server):
    status, _, reply = post_chat(server.port, {"messages": QUESTION, "max_tokens": 2, "max_completion_tokens": 4,
                                               "temperature": 0})
    assert status == 200 and reply["usage"]["completion_tokens"] == 4
    with running_server(max_tokens_cap=3) as srv:
        status, _, reply = post_chat(srv.port, {"messages": QUESTION, "max_tokens": 10 ** 400, "temperature": 0})
    assert status == 200 and reply["usage"]["completion_tokens"] == 3


def test_a_conversation_longer_than_the_context_is_a_400_and_a_model_failure_a_500(server):
    with running_server(tiny(max_position_embeddings=16)) as srv:
        error = assert_json_error(*post_chat(srv.port, {"messages": QUESTION}), 400, "messages")
        assert "context is 16" in error["message"]
    prompt = len(server.tokenizer.encode(server.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)))
    with running_server(max_context=prompt) as srv:  # --max_context below the model's context: the same, at it
        error = assert_json_error(*post_chat(srv.port, {"messages": QUESTION}), 400, "messages")
        assert f"context is {prompt} (--max_context, at most the model's 32768)" in error["message"]
    with running_server(max_context=prompt + 3) as srv:  # and the reply ends there
        status, _, reply = post_chat(srv.port, {"messages": QUESTION, "max_tokens": 8, "temperature": 0})
    assert status == 200 and reply["usage"]["completion_tokens"] == 3
    assert reply["choices"][0]["finish_reason"] == "length"
    model = tiny()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")
    model.model.forward = broken  # the transformer body, which generation runs (it applies lm_head itself)
    with running_server(model) as srv:
        error = assert_json_error(*post_chat(srv.port, {"messages": QUESTION}), 500)
        assert "out of memory (simulated)" in error["message"]
        status, _, body = request(srv.port, "POST", "/v1/chat/completions", {"messages": QUESTION, "stream": True})
        data = events(body)
        assert status == 200 and data[-1] != "[DONE]" and "out of memory (simulated)" in data[-1]["error"]["message"]
        assert request(srv.port, "GET", "/v1/models")[0] == 200  # the model's thread lives on


# ---------------------------------------------------------------- access

def test_an_api_key_guards_v1_but_not_the_page():
    with running_server(api_key="sekrit") as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sekrit"}):
            status, h, body = request(srv.port, "GET", "/v1/models", headers=headers)
            assert_json_error(status, h, body, 401)
            assert json.loads(body)["error"]["code"] == "invalid_api_key" and h["www-authenticate"] == "Bearer"
        assert_json_error(*post_chat(srv.port, {"messages": QUESTION}), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekrit", max_retries=0, timeout=60)
        assert [m.id for m in good.models.list()] == ["tiny"]
        assert good.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2).usage.completion_tokens
        assert request(srv.port, "GET", "/")[0] == 200


def test_cors_is_off_unless_an_origin_is_named(server):
    origin = {"Origin": "https://elsewhere.example"}
    status, headers, _ = request(server.port, "GET", "/v1/models", headers=origin)
    assert status == 200 and "access-control-allow-origin" not in headers
    preflight = {**origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    status, headers, body = request(server.port, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert_json_error(status, headers, body, 405)
    assert "access-control-allow-origin" not in headers
    with running_server(cors_origins=("https://app.example",)) as srv:
        ok = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        status, headers, _ = request(srv.port, "OPTIONS", "/v1/chat/completions", headers=ok)
        assert status == 204 and headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in headers["access-control-allow-methods"]
        assert "authorization" in headers["access-control-allow-headers"].lower()
        status, headers, _ = request(srv.port, "GET", "/v1/models", headers={"Origin": "https://app.example"})
        assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
        status, headers, _ = request(srv.port, "GET", "/v1/models", headers=origin)
        assert status == 200 and "access-control-allow-origin" not in headers


def test_a_loopback_server_answers_only_loopback_host_names(server):
    for host in ("localhost", "localhost:8998", "127.0.0.1", "127.0.0.2:1", "[::1]:8998", "chat.localhost"):
        assert request(server.port, "GET", "/v1/models", headers={"Host": host})[0] == 200, host
    for host in ("evil.example", "evil.example:8998", "127.0.0.1.evil.example", "localhost.evil.example", "[::2]"):
        status, headers, body = request(server.port, "GET", "/", headers={"Host": host})
        assert "DNS-rebinding" in assert_json_error(status, headers, body, 400)["message"], host
    with running_server(loopback_only=False) as srv:
        assert request(srv.port, "GET", "/v1/models", headers={"Host": "chat.example"})[0] == 200


def test_no_server_header_and_the_page_is_served(server):
    status, headers, body = request(server.port, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and "server" not in headers
    assert b"/v1/chat/completions" in body and headers["x-frame-options"] == "DENY"
    status, headers, body = request(server.port, "GET", "/v1/models")
    assert json.loads(body)["data"][0]["id"] == "tiny" and "server" not in headers


# ---------------------------------------------------------------- the queue, time limits, departing clients

def _open_chat(port, body):
    """Send a chat request on a raw socket and return the socket without reading."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return s


def _wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_a_full_queue_answers_429_and_departed_clients_leave_it():
    model = tiny()
    calls = slow_down(model, 0.05)
    with running_server(model, max_queue=1, max_batch=1) as srv:
        long = {"messages": QUESTION, "max_tokens": 2000}
        first = _open_chat(srv.port, long)
        _wait_for(lambda: srv.scheduler.running)
        second = _open_chat(srv.port, long)
        _wait_for(lambda: srv.scheduler.waiting == 1)
        status, headers, body = request(srv.port, "POST", "/v1/chat/completions", {"messages": QUESTION})
        error = assert_json_error(status, headers, body, 429)
        assert error["code"] == "queue_full" and int(headers["retry-after"]) >= 1
        second.close()  # a waiting client goes away: its place frees
        _wait_for(lambda: srv.scheduler.waiting == 0)
        first.close()  # the running one goes away: generation stops
        _wait_for(lambda: not srv.scheduler.running)
        stopped = len(calls)
        time.sleep(0.3)
        assert len(calls) == stopped < 200
        assert post_chat(srv.port, {"messages": QUESTION, "max_tokens": 2})[0] == 200


def test_a_departed_stream_stops_generating():
    model = tiny()
    calls = slow_down(model, 0.05)
    with running_server(model) as srv:
        s = _open_chat(srv.port, {"messages": QUESTION, "max_tokens": 2000, "stream": True})
        assert b"200 OK" in s.recv(65536)
        _wait_for(lambda: len(calls) >= 3)
        s.close()
        _wait_for(lambda: not srv.scheduler.running)
        stopped = len(calls)
        time.sleep(0.3)
        assert len(calls) == stopped < 200


def test_the_request_time_limit():
    model = tiny()
    slow_down(model, 0.05)
    with running_server(model, request_timeout=1.0) as srv:
        started = time.monotonic()
        error = assert_json_error(*post_chat(srv.port, {"messages": QUESTION, "max_tokens": 2000}), 503)
        assert error["code"] == "timeout" and "--request_timeout" in error["message"]
        assert time.monotonic() - started < 5
        status, _, body = request(srv.port, "POST", "/v1/chat/completions",
                                  {"messages": QUESTION, "max_tokens": 2000, "stream": True})
        data = events(body)
        assert status == 200 and data[-1]["error"]["code"] == "timeout" and "[DONE]" not in data
        _wait_for(lambda: not srv.scheduler.running)


def test_tokenising_a_big_prompt_leaves_the_server_responsive(server):
    """A ~1 MB conversation takes about a second to tokenise: /v1/models answers meanwhile (the tokenizer runs in a
    thread without the GIL), and the conversation is then refused as longer than the context."""
    big = {"messages": [{"role": "user", "content": "你好 Who is Ada? " * 45000}]}
    result = {}

    def post_big():
        result["reply"] = post_chat(server.port, big)
        result["done"] = time.monotonic()
    thread = threading.Thread(target=post_big)
    thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    assert request(server.port, "GET", "/v1/models")[0] == 200
    answered = time.monotonic()
    thread.join(60)
    assert_json_error(*result["reply"], 400, "messages")
    assert answered < result["done"], "the big prompt was done before /v1/models was asked: nothing was measured"
    assert answered - started < 0.5


SIXTEEN = [dict(messages=[{"role": "user", "content": f"Question {i}: who is Ada?"}], seed=100 + i, temperature=1.0,
                top_p=1.0, max_tokens=6, stream=i % 2 == 1) for i in range(16)]


def ask(client, kwargs):
    """The reply's text, streamed or not."""
    reply = client.chat.completions.create(model="tiny", **kwargs)
    if kwargs["stream"]:
        return "".join(c.choices[0].delta.content or "" for c in reply)
    return reply.choices[0].message.content


def ask_together(client, asks):
    together = [None] * len(asks)

    def run(i):
        together[i] = ask(client, asks[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    return threads, together


def test_sixteen_concurrent_clients_get_the_replies_they_get_alone(server, client):
    alone = [ask(client, a) for a in SIXTEEN]
    threads, together = ask_together(client, SIXTEEN)
    for t in threads:
        t.join(120)
    assert together == alone
    assert len(set(alone)) > 8  # different prompts and seeds really differ


def test_sixteen_clients_decode_in_one_batch_and_get_the_replies_they_get_alone():
    """The 16 requests above, held until all 16 are in: the first ones are prefilled (one group, or a few when the
    machine is slow to deliver the requests), the rest join at the next step, and then each step decodes all 16 rows
    in one forward."""
    model = tiny()
    gate = threading.Event()
    shapes = forward_shapes(model, gate)
    with running_server(model) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        gate.set()
        alone = [ask(client, a) for a in SIXTEEN]
        assert max(rows for rows, _ in shapes) == 1
        gate.clear()
        shapes.clear()
        threads, together = ask_together(client, SIXTEEN)
        _wait_for(lambda: len(srv.scheduler.running) + srv.scheduler.waiting == 16, timeout=60)
        gate.set()
        for t in threads:
            t.join(120)
    assert together == alone
    prefills = [rows for rows, tokens in shapes if tokens > 1]
    assert sum(prefills) == 16 and len(prefills) <= 3, prefills  # 16 rows joined in at most 3 groups
    decodes = [rows for rows, tokens in shapes if tokens == 1]
    # once all have joined, every forward decodes all 16 rows (fewer as replies end)
    full = decodes.index(16)
    assert decodes[full:] == sorted(decodes[full:], reverse=True) and full <= len(prefills), decodes


# ---------------------------------------------------------------- the command line

def test_the_command_line_serves_a_weight_file_with_an_api_key_from_the_environment(tmp_path):
    save_fp16(tiny(), tmp_path / "full_sft_64.pth")
    proc = subprocess.Popen([sys.executable, "-m", "minimind.serve", "full_sft", "--out_dir", str(tmp_path),
                             "--port", "0", "--device", "cpu", "--max_new_tokens", "4"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MINIMIND_API_KEY": "from-env"})
    try:
        line = proc.stdout.readline()
        assert "full_sft_64" in line and "API key required" in line, \
            proc.stderr.read() if proc.poll() is not None else line
        base = line.split("API base ")[1].split()[0]
        port = int(base.rsplit(":", 1)[1].split("/")[0])
        assert_json_error(*post_chat(port, {"messages": QUESTION}), 401)
        reply = openai.OpenAI(base_url=base, api_key="from-env", max_retries=0, timeout=60).chat.completions.create(
            model="x", messages=QUESTION)
        assert reply.model == "full_sft_64" and reply.usage.completion_tokens <= 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode is not None


@pytest.mark.parametrize("flag, value", [("--max_queue", "-1"), ("--request_timeout", "0"),
                                         ("--keep_alive_timeout", "nan"), ("--max_body_bytes", "0"),
                                         ("--max_batch", "0"), ("--max_context", "1")])
def test_the_command_line_refuses_bad_limits_before_loading_anything(flag, value, capsys):
    from minimind.serve import main
    with pytest.raises(SystemExit) as e:
        main(["no_such_weights", flag, value])
    assert e.value.code == 2 and f"argument {flag}: must be" in capsys.readouterr().err
