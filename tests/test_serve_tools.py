"""Thinking and tool calls through the OpenAI-compatible server, with the official `openai` client: the reasoning
apart from the answer (reasoning_content, in streamed deltas too), tools rendered into the prompt, the reply's
<tool_call> blocks returned as OpenAI tool_calls with finish_reason tool_calls, and a whole tool-calling round trip
against a fake tool, streamed and not. The model is scripted (tests/scripted_model.py): it says what the test
wants, and the prompts it was given are checked against the chat template. The real minimind-3 tokenizer."""
import json

import openai
import pytest

from minimind.generate import SamplingConfig
from tests.scripted_model import minimind3_tokenizer, scripted_model
from tests.serve_helpers import assert_json_error, events, post_chat, request, running_server
from tests.test_chat import tiny

ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "What is 2 + 3?"}]
CALL_ADD = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
CALL_WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer():
    return minimind3_tokenizer()


@pytest.fixture(scope="module")
def server(tokenizer):
    with running_server(scripted_model(tokenizer), tokenizer, sampling=SamplingConfig(max_new_tokens=200)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def prompt_of(server, messages, **options):
    """The ids of the prompt the template renders for `messages` (what the server must have given the model)."""
    tok = server.tokenizer
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, **options))


def streamed(chunks):
    """(reasoning, content, tool calls assembled from their deltas as a client does, finish_reason, order of the
    delta kinds)."""
    reasoning, content, calls, kinds, finish = "", "", {}, [], None
    for c in chunks:
        if not c.choices:
            continue
        delta, finish = c.choices[0].delta, c.choices[0].finish_reason or finish
        if getattr(delta, "reasoning_content", None):
            reasoning += delta.reasoning_content
            kinds.append("reasoning")
        if delta.content:
            content += delta.content
            kinds.append("content")
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            call["id"] += d.id or ""
            call["function"]["name"] += d.function.name or ""
            call["function"]["arguments"] += d.function.arguments or ""
            kinds.append("tool_call")
    return reasoning, content, [calls[i] for i in sorted(calls)], finish, kinds


@pytest.mark.parametrize("switch", [{"extra_body": {"chat_template_kwargs": {"enable_thinking": True}}},
                                    {"extra_body": {"chat_template_kwargs": {"open_thinking": True}}},
                                    {"reasoning_effort": "high"}], ids=["enable_thinking", "open_thinking", "effort"])
def test_thinking_comes_apart_from_the_answer_whole_and_streamed(server, client, switch):
    server.model.say("Let me see.\n2 + 3 is 5.\n</think>\n\nIt is 5.")
    reply = client.chat.completions.create(model="m", messages=ASK, **switch)
    message = reply.choices[0].message
    assert (message.reasoning_content, message.content) == ("Let me see.\n2 + 3 is 5.", "It is 5.")
    assert reply.choices[0].finish_reason == "stop" and message.tool_calls is None
    assert server.model.prompts[-1] == prompt_of(server, ASK, enable_thinking=True)  # ends "<think>\n"
    reasoning, content, calls, finish, kinds = streamed(client.chat.completions.create(
        model="m", messages=ASK, stream=True, **switch))
    assert (reasoning, content, calls, finish) == ("Let me see.\n2 + 3 is 5.", "It is 5.", [], "stop")
    assert kinds.index("content") > max(i for i, k in enumerate(kinds) if k == "reasoning")


def test_thinking_is_off_unless_asked(server, client):
    server.model.say("It is 5.")
    for extra in ({}, {"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"}):
        message = client.chat.completions.create(model="m", messages=ASK, extra_body=extra).choices[0].message
        assert (message.content, message.reasoning_content) == ("It is 5.", None)
        assert server.model.prompts[-1] == prompt_of(server, ASK, enable_thinking=False)  # the empty think block
    # a model that thinks although the prompt closed its thinking: still apart
    server.model.say("<think>\nhmm\n</think>\n\nFive.")
    message = client.chat.completions.create(model="m", messages=ASK).choices[0].message
    assert (message.reasoning_content, message.content) == ("hmm", "Five.")


def fake_add(arguments: str) -> str:
    args = json.loads(arguments)
    return json.dumps({"result": args["a"] + args["b"]})


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_tool_calling_round_trip_with_the_openai_client(server, client, stream):
    """The model calls add, the client runs it and sends the result back as a tool message, the model answers:
    the second prompt is the template's rendering of the whole exchange, tools listed, the call and its result in
    place."""
    server.model.say("I need the calculator.\n</think>\n\n" + CALL_ADD, "It gave 5.\n</think>\n\n2 + 3 = 5.")
    thinking = {"chat_template_kwargs": {"enable_thinking": True}}
    first = client.chat.completions.create(model="m", messages=ASK, tools=[ADD], stream=stream, extra_body=thinking)
    if stream:
        reasoning, content, calls, finish, _ = streamed(first)
    else:
        message, finish = first.choices[0].message, first.choices[0].finish_reason
        reasoning, content = message.reasoning_content, message.content
        calls = [c.model_dump() for c in message.tool_calls]
    assert finish == "tool_calls" and reasoning == "I need the calculator." and content in (None, "")
    assert len(calls) == 1 and calls[0]["function"]["name"] == "add" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 2, "b": 3}
    assert server.model.prompts[0] == prompt_of(server, ASK, tools=[ADD], enable_thinking=True)

    messages = ASK + [{"role": "assistant", "content": content or None, "reasoning_content": reasoning,
                       "tool_calls": calls},
                      {"role": "tool", "tool_call_id": calls[0]["id"],
                       "content": fake_add(calls[0]["function"]["arguments"])}]
    second = client.chat.completions.create(model="m", messages=messages, tools=[ADD], stream=stream,
                                            extra_body=thinking)
    if stream:
        _, answer, calls2, finish, _ = streamed(second)
    else:
        answer, calls2, finish = (second.choices[0].message.content, second.choices[0].message.tool_calls or [],
                                  second.choices[0].finish_reason)
    assert (answer, calls2, finish) == ("2 + 3 = 5.", [], "stop")
    rendered = [ASK[0], {"role": "assistant", "content": "", "reasoning_content": "I need the calculator.",
                         "tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]},
                {"role": "tool", "content": '{"result": 5}'}]
    assert server.model.prompts[1] == prompt_of(server, rendered, tools=[ADD], enable_thinking=True)


def test_an_openai_reply_message_sent_back_as_is_is_taken(server, client):
    """`messages.append(reply.choices[0].message)`, the usual client code: its null fields are accepted."""
    server.model.say(CALL_ADD, "5")
    first = client.chat.completions.create(model="m", messages=ASK, tools=[ADD])
    call = first.choices[0].message.tool_calls[0]
    sent_back = first.choices[0].message.model_dump()  # refusal, audio, function_call, annotations: None
    assert {"refusal", "audio", "function_call"} <= set(sent_back)
    messages = ASK + [sent_back, {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    assert client.chat.completions.create(model="m", messages=messages, tools=[ADD]).choices[0].message.content == "5"


def test_several_calls_text_around_them_and_a_broken_block(server, client):
    reply_text = "我来查一下。\n" + CALL_ADD + "\n" + CALL_WEATHER
    server.model.say(reply_text)
    for stream in (False, True):
        response = client.chat.completions.create(model="m", messages=ASK, tools=[ADD, WEATHER], stream=stream)
        if stream:
            _, content, calls, finish, _ = streamed(response)
        else:
            m = response.choices[0].message
            content, finish = m.content, response.choices[0].finish_reason
            calls = [c.model_dump() for c in m.tool_calls]
        assert content == "我来查一下。" and finish == "tool_calls"
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
            ("add", {"a": 2, "b": 3}), ("get_weather", {"city": "北京"})]
        assert len({c["id"] for c in calls}) == 2
    # parallel_tool_calls false: the first call only
    m = client.chat.completions.create(model="m", messages=ASK, tools=[ADD, WEATHER],
                                       parallel_tool_calls=False).choices[0].message
    assert [c.function.name for c in m.tool_calls] == ["add"]
    # a block that is not a call stays in the content
    broken = 'Hm <tool_call>\n{"name": "add", "arguments": {a: 2}}\n</tool_call>'
    server.model.say(broken)
    reply = client.chat.completions.create(model="m", messages=ASK, tools=[ADD])
    assert (reply.choices[0].message.content, reply.choices[0].message.tool_calls) == (broken, None)
    assert reply.choices[0].finish_reason == "stop"


def test_tool_choice_none_and_no_tools_leave_the_calls_as_text(server, client):
    server.model.say(CALL_ADD)
    for kwargs in ({"tools": [ADD], "tool_choice": "none"}, {}):
        reply = client.chat.completions.create(model="m", messages=ASK, **kwargs)
        assert reply.choices[0].message.content == CALL_ADD and reply.choices[0].finish_reason == "stop"
        assert server.model.prompts[-1] == prompt_of(server, ASK)  # no tools listed
    reply = client.chat.completions.create(model="m", messages=ASK, tools=[ADD], tool_choice="auto")
    assert reply.choices[0].finish_reason == "tool_calls"
    assert server.model.prompts[-1] == prompt_of(server, ASK, tools=[ADD])


REQUIRED_START, ADD_START = '<tool_call>\n{"name": "', '<tool_call>\n{"name": "add", "arguments": '


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("choice, start", [
    ("required", REQUIRED_START),
    ({"type": "function", "function": {"name": "add"}}, ADD_START)], ids=["required", "named"])
def test_a_forced_tool_choice_writes_the_calls_opening_for_the_model(server, client, choice, start, stream):
    """The server writes the opening of a call after the prompt (in the ids the model is given), the model goes on
    from there, and the reply is read from the opening on: a tool call, finish_reason tool_calls."""
    server.model.say(CALL_ADD[len(start):])  # the model writes only the rest
    reply = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, ADD], tool_choice=choice,
                                           stream=stream)
    if stream:
        _, content, calls, finish, _ = streamed(reply)
    else:
        message, finish = reply.choices[0].message, reply.choices[0].finish_reason
        content, calls = message.content, [c.model_dump() for c in message.tool_calls]
    assert finish == "tool_calls" and content in (None, "") and len(calls) == 1
    assert calls[0]["function"]["name"] == "add" and json.loads(calls[0]["function"]["arguments"]) == {"a": 2, "b": 3}
    tok = server.tokenizer
    assert server.model.prompts[-1] == tok.encode(tok.apply_chat_template(ASK, add_generation_prompt=True,
                                                                          tools=[WEATHER, ADD]) + start)
    if not stream:  # the written opening counts in the prompt's tokens, the model's own in the completion's
        assert reply.usage.prompt_tokens == len(server.model.prompts[-1])
        assert reply.usage.completion_tokens == len(tok.encode(CALL_ADD[len(start):]))


def test_a_forced_call_that_does_not_parse_stays_in_the_content(server, client):
    server.model.say('add", "arguments": {a: 2}}\n</tool_call>')
    reply = client.chat.completions.create(model="m", messages=ASK, tools=[ADD], tool_choice="required")
    assert reply.choices[0].message.content == REQUIRED_START + 'add", "arguments": {a: 2}}\n</tool_call>'
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "stop"


def test_the_models_capabilities(server):
    status, _, body = request(server.port, "GET", "/v1/models")
    assert json.loads(body)["data"][0]["capabilities"] == ["thinking", "tools"]
    with running_server(tiny()) as minimind2:  # the bundled tokenizer: MiniMind2's format
        assert json.loads(request(minimind2.port, "GET", "/v1/models")[2])["data"][0]["capabilities"] == []


CALLED = ASK + [{"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]}]


@pytest.mark.parametrize("body, param, says", [
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "call_1", "content": "5"}]}, "messages[1].tool_call_id",
     "must answer a tool call"),
    ({"messages": CALLED + [{"role": "tool", "tool_call_id": "call_2", "content": "5"}]}, "messages[2].tool_call_id",
     "'call_2' is none of ['call_1']"),
    ({"messages": CALLED + [{"role": "tool", "content": "5"}]}, "messages[2].tool_call_id", "Field required"),
    ({"messages": CALLED}, "messages[1].role", "the last message must be the user's"),
    ({"messages": [{"role": "user", "content": "hi", "tool_call_id": "x"}]}, "messages[0].tool_call_id",
     "a user message has no tool_call_id (only tool messages do)"),
    ({"messages": [{"role": "function", "content": "hi"}]}, "messages[0].role", "the role must be"),
    ({"messages": ["hi"]}, "messages[0]", "a message must be a JSON object"),
    ({"messages": ASK, "tools": []}, "tools", "at least 1"),
    ({"messages": ASK, "tools": [{"type": "function", "function": {"name": "two words"}}]}, "tools[0].function.name",
     "pattern"),
    ({"messages": ASK, "tools": [{"type": "function", "function": {"name": "f", "strict": True}}]},
     "tools[0].function.strict", "constrained decoding"),
    ({"messages": ASK, "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"messages": ASK, "tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "mul"}}},
     "tool_choice.function.name", "'mul' is none of the tools (add)"),
    ({"messages": ASK, "tools": [ADD], "tool_choice": "required", "reasoning_effort": "low"}, "tool_choice",
     "needs thinking off"),
    ({"messages": ASK, "tools": [ADD], "tool_choice": "any"}, "tool_choice", "'auto', 'none' or 'required'"),
    ({"messages": ASK, "tools": [ADD], "tool_choice": {"type": "function"}}, "tool_choice.function",
     "Field required"),
    ({"messages": ASK, "chat_template_kwargs": {"enable_thinking": True, "open_thinking": False}},
     "chat_template_kwargs.enable_thinking", "disagree on thinking"),
    ({"messages": ASK, "chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "none"},
     "chat_template_kwargs.enable_thinking", "disagree on thinking"),
    ({"messages": ASK, "chat_template_kwargs": {"add_vision_id": True}}, "chat_template_kwargs.add_vision_id",
     "unrecognized"),
    ({"messages": ASK, "reasoning_effort": "extreme"}, "reasoning_effort", "'none', 'minimal'"),
    ({"messages": ASK + [{"role": "assistant", "content": "x", "refusal": "no"}, ASK[0]]}, "messages[1].refusal",
     "only null"),
    ({"messages": ASK, "functions": [{"name": "f"}]}, "functions", "send tools instead"),
])
def test_bad_tool_and_thinking_requests_are_400s_that_name_the_field(server, body, param, says):
    error = assert_json_error(*post_chat(server.port, body), 400, param)
    assert says in error["message"], error


@pytest.mark.parametrize("body, param", [
    ({"messages": ASK, "tools": [ADD]}, "tools"),
    ({"messages": ASK, "chat_template_kwargs": {"enable_thinking": True}}, "chat_template_kwargs"),
    ({"messages": ASK, "reasoning_effort": "low"}, "reasoning_effort"),
    ({"messages": CALLED + [{"role": "tool", "tool_call_id": "call_1", "content": "5"}]}, "messages[1].tool_calls"),
])
def test_a_minimind2_model_refuses_tools_and_thinking_clearly(body, param):
    with running_server(tiny()) as srv:
        error = assert_json_error(*post_chat(srv.port, body), 400, param)
        assert "MiniMind2's chat format" in error["message"] and "minimind-3 tokenizer" in error["message"]
        for harmless in ({"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"},
                         {"tool_choice": "none"}, {"parallel_tool_calls": True}):
            assert post_chat(srv.port, {"messages": ASK, "max_tokens": 2, **harmless})[0] == 200, harmless


def test_streamed_chunks_carry_the_tool_call_deltas_raw(server):
    """The raw stream, as other clients read it: role first, then one chunk per delta, the finish reason, [DONE]."""
    server.model.say("ok\n</think>\n\n" + CALL_ADD)
    status, _, body = request(server.port, "POST", "/v1/chat/completions", {
        "messages": ASK, "tools": [ADD], "stream": True, "chat_template_kwargs": {"enable_thinking": True}})
    data = events(body)
    deltas = [d["choices"][0]["delta"] for d in data[:-1]]
    assert status == 200 and data[-1] == "[DONE]" and deltas[0] == {"role": "assistant", "content": ""}
    assert {"reasoning_content": "ok"} in deltas
    call = next(d["tool_calls"][0] for d in deltas if "tool_calls" in d)
    assert call["index"] == 0 and call["type"] == "function" and call["function"]["name"] == "add"
    assert data[-2]["choices"][0]["finish_reason"] == "tool_calls"
