"""The OpenAI-compatible server (minimind.serve): replies equal the library's, streaming equals non-streaming,
bad requests are 400s that name the field, and the command line serves a weight file."""
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
import torch

from minimind.generate import SamplingConfig, chat
from minimind.serve import ChatServer
from minimind.tokenizer import load_tokenizer
from tests.test_chat import save_fp16, tiny
from tests.train_helpers import ROOT

QUESTION = [{"role": "user", "content": "Who is Ada? 你好"}]


@pytest.fixture(scope="module")
def server():
    model, tok = tiny(), load_tokenizer()
    srv = ChatServer(("127.0.0.1", 0), model, tok, "tiny", SamplingConfig(max_new_tokens=8))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", model, tok
    srv.shutdown()
    srv.server_close()


def post(url, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def events(text):
    """The data payloads of a server-sent event stream."""
    return [block[len("data: "):] for block in text.split("\n\n") if block.startswith("data: ")]


def test_reply_equals_the_library(server):
    url, model, tok = server
    status, ctype, text = post(url, {"model": "tiny", "messages": QUESTION, "temperature": 0, "max_tokens": 6})
    assert status == 200 and ctype.startswith("application/json")
    body = json.loads(text)
    want = chat(model, tok, QUESTION, max_new_tokens=6, temperature=0.0)
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": want}
    prompt = len(tok.encode(tok.apply_chat_template(QUESTION, add_generation_prompt=True)))
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": 6, "total_tokens": prompt + 6}


def test_stream_equals_non_stream(server):
    url, model, tok = server
    request = {"messages": QUESTION, "temperature": 0, "max_tokens": 7}
    plain = json.loads(post(url, request)[2])["choices"][0]["message"]["content"]
    status, ctype, text = post(url, {**request, "stream": True})
    assert status == 200 and ctype.startswith("text/event-stream")
    data = events(text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == plain
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 7


def test_a_seed_makes_sampling_repeatable(server):
    url, _, _ = server
    request = {"messages": QUESTION, "temperature": 1.0, "top_p": 1.0, "max_tokens": 8, "seed": 7}
    first = json.loads(post(url, request)[2])["choices"][0]["message"]["content"]
    assert json.loads(post(url, request)[2])["choices"][0]["message"]["content"] == first
    others = {json.loads(post(url, {**request, "seed": s})[2])["choices"][0]["message"]["content"]
              for s in (1, 2, 3)}
    assert others - {first}  # another seed samples another reply


@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages[1].role"),
    ({"messages": QUESTION, "temperature": -1}, "temperature"),
    ({"messages": QUESTION, "top_p": 1.5}, "top_p"),
    ({"messages": QUESTION, "max_tokens": "many"}, "max_tokens"),
    ({"messages": QUESTION, "max_tokens": 0}, "max_tokens"),
    ({"messages": QUESTION, "stream": "yes"}, "stream"),
    ({"messages": QUESTION, "n": 2}, "n"),
    ({"messages": QUESTION, "temperature": float("nan")}, "temperature"),  # json.dumps writes NaN, json reads it
    ({"messages": QUESTION, "max_tokens": float("inf")}, "max_tokens"),
    ({"messages": QUESTION, "repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"messages": QUESTION, "seed": 2 ** 70}, "seed"),
])
def test_bad_requests_name_the_field(server, body, param):
    status, ctype, text = post(server[0], body)
    assert status == 400 and ctype.startswith("application/json")
    error = json.loads(text)["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_invalid_json_and_unknown_paths(server):
    url = server[0]
    status, _, text = post(url, None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(text)["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "/v2/nothing", timeout=10)
    assert e.value.code == 404


def test_a_kept_alive_connection_survives_a_wrong_path_and_a_bad_length(server):
    """The body of a POST to an unknown path is read, so the next request on the connection parses; a length the
    server cannot use gets a 400 and the connection closed instead of a hang."""
    import http.client
    host, port = server[0].removeprefix("http://").split(":")
    body = json.dumps({"messages": QUESTION, "temperature": 0, "max_tokens": 2})
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", "/v2/nothing", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 404 and json.loads(r.read())["error"]["type"] == "not_found"
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["usage"]["completion_tokens"] == 2
        for length in ("-1", "ten"):
            conn.close()
            conn.putrequest("POST", "/v1/chat/completions")
            conn.putheader("Content-Length", length)
            conn.endheaders()
            r = conn.getresponse()
            assert r.status == 400 and r.getheader("Connection") == "close" and "Content-Length" in r.read().decode()
    finally:
        conn.close()


def test_models_page_and_cors(server):
    url = server[0]
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny"
    with urllib.request.urlopen(url + "/", timeout=10) as r:
        page = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/html") and "/v1/chat/completions" in page
    req = urllib.request.Request(url + "/v1/chat/completions", method="OPTIONS")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in r.headers["Access-Control-Allow-Methods"]


def test_the_command_line_serves_a_weight_file(tmp_path):
    save_fp16(tiny(), tmp_path / "full_sft_64.pth")
    proc = subprocess.Popen([sys.executable, "-m", "minimind.serve", "full_sft", "--out_dir", str(tmp_path),
                             "--port", "0", "--device", "cpu", "--max_new_tokens", "4"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "full_sft_64" in line, proc.stderr.read() if proc.poll() is not None else line
        base = line.split("API base ")[1].strip()
        req = urllib.request.Request(base + "/chat/completions", data=json.dumps({"messages": QUESTION}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            body = json.loads(r.read())
        assert body["model"] == "full_sft_64" and body["usage"]["completion_tokens"] <= 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _one_off_server(model):
    srv = ChatServer(("127.0.0.1", 0), model, load_tokenizer(), "one-off", SamplingConfig(max_new_tokens=4))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


def test_a_conversation_longer_than_the_context_is_a_400_and_a_model_failure_a_500():
    srv, url = _one_off_server(tiny(max_position_embeddings=16))
    try:
        status, _, text = post(url, {"messages": QUESTION})
        assert status == 400 and json.loads(text)["error"]["param"] == "messages"
        assert "context is 16" in json.loads(text)["error"]["message"]
    finally:
        srv.shutdown()
        srv.server_close()
    model = tiny()
    srv, url = _one_off_server(model)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")
    model.model.forward = broken  # the transformer body, which generation runs (it applies lm_head itself)
    try:
        status, _, text = post(url, {"messages": QUESTION})
        assert status == 500 and "out of memory (simulated)" in json.loads(text)["error"]["message"]
    finally:
        srv.shutdown()
        srv.server_close()
