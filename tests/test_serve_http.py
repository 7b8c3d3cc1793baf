"""Hostile and broken requests against the real server: every one gets an HTTP response, a JSON body in OpenAI's
error shape with the right status (or a 200 where the request is in fact fine), never a dropped connection, a
traceback or a desynchronised keep-alive connection. Raw sockets send what a well-behaved client never would; each
exchange is bounded in time. Then schemathesis fuzzes the OpenAPI schema: no 5xx, every reply as documented."""
import json

import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.scripted_model import minimind3_tokenizer
from tests.serve_helpers import (QUESTION, assert_json_error, parse_responses, raw_exchange, request,
                                 running_server)
from tests.test_chat import tiny

KEEP_ALIVE_S, REQUEST_TIMEOUT_S, MAX_BODY = 0.5, 2.0, 1 << 20


@pytest.fixture(scope="module")
def server():
    with running_server(max_tokens_cap=2, keep_alive_timeout=KEEP_ALIVE_S, request_timeout=REQUEST_TIMEOUT_S,
                        max_body_bytes=MAX_BODY) as running:
        yield running


def chat_head(length=None, extra=b"", content_type=b"application/json", method=b"POST",
              path=b"/v1/chat/completions", host=b"127.0.0.1"):
    head = method + b" " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: " + content_type + b"\r\n"
    if length is not None:
        head += b"Content-Length: %d\r\n" % length
    return head + extra + b"\r\n"


def chat_request(body: bytes, **kw):
    return chat_head(len(body), **kw) + body


OK_BODY = json.dumps({"messages": QUESTION}).encode()
MODELS = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


# ---------------------------------------------------------------- JSON bodies: every numeric field, every hostile value

NUMERIC_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "max_completion_tokens",
                  "seed", "n", "frequency_penalty", "presence_penalty")
HOSTILE_NUMBERS = ("1" + "0" * 400, "-1" + "0" * 400, "1e400", "-1e400", "1" + "0" * 5000, "-" + "9" * 5000,
                   "NaN", "Infinity", "-Infinity", '"1"', "true", "[]", "{}", "1.5", "-1", "0", "1E-400")


@pytest.mark.parametrize("field", NUMERIC_FIELDS)
def test_hostile_numbers_in_every_numeric_field(server, field):
    """10**400 (past float), 5000-digit integers (past Python's 4300-digit int-string limit), NaN and Infinity
    (not JSON), wrong types, out-of-range values: a 400 naming the field (or the JSON) or, where the value is
    fine (a 10**400 max_tokens is capped), a 200."""
    for value in HOSTILE_NUMBERS:
        body = b'{"messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (field.encode(), value.encode())
        status, headers, reply = request(server.port, "POST", "/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
        assert headers["content-type"].startswith("application/json"), (field, value)
        if status == 200:
            assert json.loads(reply)["usage"]["completion_tokens"] <= 2
            continue
        error = assert_json_error(status, headers, reply, 400)
        assert error["param"] in (field, None), (field, value, error)  # None: not JSON at all
        if len(value) > 4300:
            assert "not valid JSON" in error["message"] and error["param"] is None


DEEP = 100_000
MALFORMED_BODIES = {
    "deeply nested array": b'{"messages": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    "deeply nested object": b'{"messages": [{"role": "user", "content": "hi"}], "metadata": '
                            + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}",
    "deeply nested content": b'{"messages": [{"role": "user", "content": ' + b"[" * 5000 + b"]" * 5000 + b"}]}",
    "lone high surrogate": b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
    "lone low surrogate": b'{"messages": [{"role": "user", "content": "\\udc00"}]}',
    "surrogate in a key": b'{"messages": [{"role": "user", "content": "hi", "\\ud800": 1}]}',
    "surrogate in the role": b'{"messages": [{"role": "\\ud800", "content": "hi"}]}',
    "bad escape": b'{"messages": [{"role": "user", "content": "\\x41"}]}',
    "not UTF-8": b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
    "UTF-8 BOM": b'\xef\xbb\xbf{"messages": [{"role": "user", "content": "hi"}]}',
    "integer text part": b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}',
    "null text part": b'{"messages": [{"role": "user", "content": [{"type": "text", "text": null}]}]}',
    "object text part": b'{"messages": [{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}]}',
    "list text part": b'{"messages": [{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]}',
    "part without text": b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}',
    "part not an object": b'{"messages": [{"role": "user", "content": ["hi"]}]}',
    "null content": b'{"messages": [{"role": "user", "content": null}]}',
    "message not an object": b'{"messages": ["hi"]}',
    "messages an object": b'{"messages": {"role": "user", "content": "hi"}}',
    "no role": b'{"messages": [{"content": "hi"}]}',
    "empty body": b"",
    "whitespace body": b" \n\t ",
    "null body": b"null",
    "array body": b"[]",
    "string body": b'"hi"',
    "number body": b"1" + b"0" * 5000,
    "trailing garbage": OK_BODY + b" {}",
    "truncated JSON": OK_BODY[:-5],
    "single quotes": b"{'messages': []}",
    "comment": b'{"messages": [] /* no */}',
    "NUL byte": b'{"messages": [{"role": "user", "content": "a\x00b"}]}',
    "stop a number": b'{"messages": [{"role": "user", "content": "hi"}], "stop": 10' + b"0" * 400 + b"}",
    "stream_options a list": b'{"messages": [{"role": "user", "content": "hi"}], "stream_options": []}',
}


@pytest.mark.parametrize("name", MALFORMED_BODIES)
def test_malformed_bodies_are_400s(server, name):
    status, headers, reply = request(server.port, "POST", "/v1/chat/completions", MALFORMED_BODIES[name],
                                     {"Content-Type": "application/json"})
    assert_json_error(status, headers, reply, 400)


def test_a_body_that_is_fine_after_all_is_answered(server):
    """Characters that are not the hostile ones: escaped non-BMP pairs, Chinese, control characters, a duplicate
    key (the last wins, as in json.loads), 10 000 messages (then: longer than the context)."""
    for body in (b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00 \xe4\xbd\xa0\xe5\xa5\xbd \\u0001"}]}',
                 b'{"messages": [], "messages": [{"role": "user", "content": "hi"}]}'):
        assert request(server.port, "POST", "/v1/chat/completions", body,
                       {"Content-Type": "application/json"})[0] == 200
    many = {"messages": [{"role": "user", "content": "hi there"}] * 10_000}
    status, headers, reply = request(server.port, "POST", "/v1/chat/completions", many)
    assert "context" in assert_json_error(status, headers, reply, 400, "messages")["message"]


# ---------------------------------------------------------------- HTTP framing, on raw sockets

def only_response(data: bytes):
    responses = parse_responses(data)
    assert len(responses) == 1, responses
    return responses[0]


def test_a_post_without_length_is_refused_and_its_body_never_runs(server):
    """Keep-alive desync: a POST without Content-Length has no body in HTTP/1.1, so what follows would be read as
    the next request. It gets a 411 and the connection closes, so the smuggled request is never answered."""
    status, headers, body = only_response(raw_exchange(server.port, chat_head() + MODELS))
    assert_json_error(status, headers, body, 411)
    assert headers["connection"] == "close"


def test_the_body_of_a_get_never_runs_as_a_request(server):
    """A GET with a body (framed by Content-Length or chunked) is answered, then the connection closes: the body,
    here a request of its own, is never answered."""
    for head in (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(MODELS),
                 b"GET /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"):
        data = head + MODELS if b"Length" in head else head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(MODELS), MODELS)
        status, headers, body = only_response(raw_exchange(server.port, data))
        assert headers["connection"] == "close"
        if b"chunked" in head:
            assert_json_error(status, headers, body, 405)
        else:
            assert status == 200 and headers["content-type"].startswith("text/html")


def test_bytes_after_a_get_are_the_next_request(server):
    """Without a Content-Length a GET has no body: bytes after it are a request of their own, here a malformed
    one, which gets a JSON 400 (not uvicorn's plain text)."""
    responses = parse_responses(raw_exchange(server.port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                                                          b'{"messages": []}\r\n\r\n'))
    assert [r[0] for r in responses] == [200, 400]
    assert_json_error(*responses[1], 400)


def test_pipelined_requests_after_an_error_stay_in_step(server):
    """A 400 for bad JSON with a valid Content-Length keeps the connection: the next request is read right."""
    data = chat_request(b"{not json") + chat_request(OK_BODY) + MODELS
    responses = parse_responses(raw_exchange(server.port, data, timeout=5))
    assert [r[0] for r in responses] == [400, 200, 200]
    assert json.loads(responses[1][2])["object"] == "chat.completion"
    assert json.loads(responses[2][2])["object"] == "list"


HTTP_CASES = {
    # name: (bytes sent, status wanted)
    "conflicting Content-Length": (chat_head(extra=b"Content-Length: 5\r\nContent-Length: 6\r\n") + OK_BODY, 400),
    "Content-Length and Transfer-Encoding": (
        chat_head(len(OK_BODY), extra=b"Transfer-Encoding: chunked\r\n") + OK_BODY, 400),
    "Transfer-Encoding gzip": (chat_head(extra=b"Transfer-Encoding: gzip\r\n") + OK_BODY, 400),
    "bad chunk size": (chat_head(extra=b"Transfer-Encoding: chunked\r\n") + b"zz\r\nhello\r\n0\r\n\r\n", 400),
    "non-numeric Content-Length": (chat_head(extra=b"Content-Length: ten\r\n") + OK_BODY, 400),
    "negative Content-Length": (chat_head(extra=b"Content-Length: -1\r\n") + OK_BODY, 400),
    "Content-Length over the limit": (chat_head(MAX_BODY + 1), 413),
    "Content-Length of an exabyte": (chat_head(10 ** 18), 413),
    "Content-Length past 19 digits": (chat_head(10 ** 30), 400),  # h11 refuses it
    "chunked body over the limit": (chat_head(extra=b"Transfer-Encoding: chunked\r\n")
                                    + b"%x\r\n" % (MAX_BODY + 10) + b"x" * (MAX_BODY + 10) + b"\r\n0\r\n\r\n", 413),
    "garbage request line": (b"HELLO THERE\r\n\r\n", 400),
    "binary garbage": (bytes(range(256)) * 4, 400),
    "non-ASCII path": (b"GET /v1/mod\xc3\xa9ls HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    "a 200 KB head": (b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
                      400),  # h11 keeps at most 16 KiB of an unfinished head
    "header without a colon": (b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon here\r\n\r\n", 400),
    "no Host in HTTP/1.1": (b"GET /v1/models HTTP/1.1\r\n\r\n", 400),
    "no Host in HTTP/1.0": (b"GET /v1/models HTTP/1.0\r\n\r\n", 400),
    "a foreign Host": (b"GET /v1/models HTTP/1.1\r\nHost: rebind.example\r\n\r\n", 400),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    "unknown method": (b"BREW /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405),
    "DELETE": (b"DELETE /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405),
    "GET on the chat endpoint": (b"GET /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405),
    "unknown path": (b"GET /v2/nothing HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404),
    "POST to an unknown path": (chat_request(OK_BODY, path=b"/v1/completions"), 404),
    "not JSON": (chat_request(b"messages=hi", content_type=b"application/x-www-form-urlencoded"), 415),
    "text/plain": (chat_request(OK_BODY, content_type=b"text/plain"), 415),
    "an empty body": (chat_request(b""), 400),
}


@pytest.mark.parametrize("name", HTTP_CASES)
def test_malformed_http_gets_a_json_error(server, name):
    data, want = HTTP_CASES[name]
    status, headers, body = parse_responses(raw_exchange(server.port, data))[0]
    assert_json_error(status, headers, body, want)


def test_duplicate_equal_content_lengths_are_one(server):
    """RFC 9112 §6.3: identical duplicates may be taken as one value (h11 does); conflicting ones are a 400."""
    data = chat_head(extra=b"Content-Length: %d\r\nContent-Length: %d\r\n" % (len(OK_BODY), len(OK_BODY))) + OK_BODY
    assert only_response(raw_exchange(server.port, data))[0] == 200


def test_a_conflicting_length_closes_the_connection(server):
    data = chat_head(extra=b"Content-Length: 5\r\nContent-Length: 6\r\n") + OK_BODY + MODELS
    status, headers, body = only_response(raw_exchange(server.port, data))
    assert_json_error(status, headers, body, 400)
    assert headers["connection"] == "close"


def test_a_client_still_sending_a_big_body_reads_its_413(server):
    """The 413 is answered from the headers, before the body; the server then lingers, reading and dropping the
    body, so the client's socket is not reset under it and the answer arrives (http.client and the openai
    client both send the whole body before they read)."""
    status, headers, body = request(server.port, "POST", "/v1/chat/completions", b"x" * (4 * MAX_BODY),
                                    {"Content-Type": "application/json"})
    assert "--max_body_bytes" in assert_json_error(status, headers, body, 413)["message"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * (2 * MAX_BODY)}])
    assert e.value.status_code == 413


def test_an_expect_100_continue_body_is_read(server):
    data = chat_head(len(OK_BODY), extra=b"Expect: 100-continue\r\n")
    received = raw_exchange(server.port, data + OK_BODY, timeout=10)
    assert received.startswith(b"HTTP/1.1 100") and b"HTTP/1.1 200" in received


# ---------------------------------------------------------------- slow and idle clients

def test_an_idle_connection_is_closed(server):
    assert raw_exchange(server.port, b"", timeout=KEEP_ALIVE_S + 5) == b""  # closed by the server, not by timeout


def test_a_request_head_sent_too_slowly_is_a_408(server):
    received = raw_exchange(server.port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0", timeout=KEEP_ALIVE_S + 5)
    status, headers, body = only_response(received)
    assert "request head" in assert_json_error(status, headers, body, 408)["message"]


def test_a_body_sent_too_slowly_is_a_408(server):
    received = raw_exchange(server.port, chat_head(len(OK_BODY)) + OK_BODY[:10], timeout=REQUEST_TIMEOUT_S + 5)
    status, headers, body = only_response(received)
    assert "body" in assert_json_error(status, headers, body, 408)["message"]


def test_a_kept_alive_connection_closes_after_the_keep_alive_timeout(server):
    received = raw_exchange(server.port, MODELS, timeout=KEEP_ALIVE_S + 5)
    assert only_response(received)[0] == 200  # and then the server closed it


# ---------------------------------------------------------------- schemathesis

@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


# What a schema-valid request may still be refused for: the rules JSON Schema cannot say (ordering in the
# conversation, two thinking switches that disagree), and, on a MiniMind2 model, tools and thinking.
CONVERSATION_RULES = ("a system message may only come first", "the last message must be the user's",
                      "a tool message must answer a tool call", "disagree on thinking")
MINIMIND2_RULES = CONVERSATION_RULES + ("MiniMind2's chat format",)


@pytest.fixture(scope="module")
def minimind3_server():
    with running_server(tiny(), minimind3_tokenizer(), max_tokens_cap=2, keep_alive_timeout=KEEP_ALIVE_S,
                        request_timeout=REQUEST_TIMEOUT_S, max_body_bytes=MAX_BODY) as running:
        yield running


@pytest.fixture(scope="module")
def minimind3_api_schema(minimind3_server):
    return schemathesis.openapi.from_url(minimind3_server.url + "/openapi.json")


minimind3_schema = schemathesis.pytest.from_fixture("minimind3_api_schema")


def check_case(case, rules):
    """No 5xx, statuses, content types, headers, bodies and stream events as documented, and a request the schema
    rejects is refused. A schema-valid request may still be refused for one of `rules` (schemathesis's
    positive_data_acceptance is replaced by this narrower check)."""
    response = case.call(timeout=30)
    case.validate_response(response, excluded_checks=[positive_data_acceptance])
    if case.meta.generation.mode is GenerationMode.POSITIVE and response.status_code == 400:
        assert any(rule in response.json()["error"]["message"] for rule in rules), response.text


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_the_openapi_schema_holds(case):
    """Generated requests, schema-valid and not, against a MiniMind2 model."""
    check_case(case, MINIMIND2_RULES)


@minimind3_schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_the_openapi_schema_holds_for_minimind3(case):
    """The same against a model with minimind-3's tokenizer: tools and thinking taken, replies read for both."""
    check_case(case, CONVERSATION_RULES)
