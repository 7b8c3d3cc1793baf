"""OpenAI's chat-completions API as minimind.serve speaks it: the request it takes and the objects it answers with.

A request is parsed by pydantic straight from the body's bytes (`ChatRequest.parse`), so the JSON parser's own
limits answer the hostile cases with a 400 instead of an exception: integers past 4300 digits, nesting deeper than
200 levels, NaN and Infinity (not JSON), lone surrogates and bytes that are not UTF-8. Types are strict (1.5 is not a
max_tokens, "1" is not a temperature) and ranges are OpenAI's.

Fields fall into four groups:
    used      messages (system / developer, user, assistant with tool_calls and reasoning_content, tool), stream,
              stream_options.include_usage, max_completion_tokens (or max_tokens), temperature, top_p, seed, stop,
              tools, tool_choice ("auto", "none", "required" or a named function: see ChatRequest.reply_start),
              parallel_tool_calls (false: the first call only),
              reasoning_effort ("none" = thinking off, any other level on: the model has one), and vLLM's top_k,
              repetition_penalty, chat_template_kwargs ({"enable_thinking": bool}, or minimind-3's own name
              open_thinking)
    ignored   model (one model is served), user, metadata, store, service_tier, prompt_cache_key,
              safety_identifier, messages[].name: ignoring them changes no reply
    limited   n, frequency_penalty, presence_penalty, logprobs, logit_bias, response_format, modalities,
              tools[].function.strict, and an assistant message's refusal, audio, function_call, annotations:
              taken only at the values this server can honour (n = 1, penalties 0, text output, null)
    refused   everything else, by name: functions, function_call, audio, ... and unknown fields
Tools and thinking need a model with minimind-3's chat format (`ChatRequest.template_options` refuses them for
MiniMind2's). An error names the field OpenAI's way (`messages[2].content`, `max_completion_tokens`).
"""
from dataclasses import replace
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag,
                      ValidationError, WithJsonSchema)

from minimind.chat_template import TOOL_CALL, ReplyReader
from minimind.generate import SamplingConfig

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # each (the reply is searched for every stop sequence after every token)
MAX_TOP_K = 1 << 20  # past any vocabulary: "all tokens", in a number a tensor can hold
MAX_TOOLS = 128  # OpenAI's limit
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's (the template writes a name into JSON unescaped)
MINIMIND2_FORMAT = "MiniMind2's chat format"  # in the refusals of what only minimind-3's format can do

# Fields OpenAI has and this server refuses, with the reason given to the client.
NOT_SUPPORTED = {
    **dict.fromkeys(("functions", "function_call"), "the deprecated functions API: send tools instead"),
    "top_logprobs": "log-probabilities are not returned",
    "audio": "only text is generated",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
}
# Fields taken only at some values, and what to say when another value comes.
LIMITED = {
    "n": "only one choice per request (n = 1) is generated",
    "frequency_penalty": "only 0 is supported; repetition_penalty is this server's penalty",
    "presence_penalty": "only 0 is supported; repetition_penalty is this server's penalty",
    "logprobs": "log-probabilities are not returned (logprobs must be false)",
    "logit_bias": "logit_bias is not supported (only an empty object)",
    "response_format": "only {\"type\": \"text\"} is supported",
    "modalities": "only [\"text\"] is supported",
    "strict": "strict schema adherence (constrained decoding) is not supported; strict must be false",
    # what an OpenAI reply's message has, as a client sends it back: null only
    "refusal": "only null is taken (this model writes no refusals)",
    "audio": "only null is taken (only text is generated)",
    "function_call": "only null is taken (send tool_calls)",
    "annotations": "only null is taken",
}
# Message fields only some roles have.
ROLE_FIELDS = {"tool_calls": "assistant", "reasoning_content": "assistant", "tool_call_id": "tool"}


def _false_only(value: bool) -> bool:
    if value:
        raise ValueError("only false is supported")
    return value


# false and nothing else (Literal[False] would take a 0)
FalseOnly = Annotated[bool, AfterValidator(_false_only), WithJsonSchema({"type": "boolean", "const": False})]


def _integral_float_as_int(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(**constraints):
    """An integer as JSON Schema has it: 2.0 is one (strict pydantic would refuse it); 2.5, "2" and true are not.
    The constraints (ge=1, ...) come first, or the schema gets pydantic's names for them instead of JSON Schema's."""
    return Annotated[int, Field(**constraints), BeforeValidator(_integral_float_as_int)]


StopSequence = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class RequestError(Exception):
    """A request the server cannot answer: a message for the client and the field at fault (OpenAI's `param`)."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


Content = Union[str, List[TextPart]]
FunctionName = Annotated[str, Field(pattern=FUNCTION_NAME)]


def text_of(content: Optional[Content]) -> str:
    return "" if content is None else content if isinstance(content, str) else "".join(p.text for p in content)


class SystemMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer"]  # developer: OpenAI's newer name for system
    content: Content
    name: Optional[str] = None  # ignored: the chat templates have no names


class UserMessage(BaseModel):
    model_config = STRICT
    role: Literal["user"]
    content: Content
    name: Optional[str] = None


class CalledFunction(BaseModel):
    model_config = STRICT
    name: FunctionName
    arguments: str = Field(description="a JSON object, as a string (rendered into the prompt as it is)")


class RequestToolCall(BaseModel):
    model_config = STRICT
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantTurn(BaseModel):
    """An earlier assistant message of the conversation."""
    model_config = STRICT
    role: Literal["assistant"]
    content: Optional[Content] = None
    reasoning_content: Optional[str] = Field(None, description="its thinking (minimind-3 renders it back)")
    tool_calls: Optional[List[RequestToolCall]] = None
    name: Optional[str] = None
    refusal: None = None  # the rest of an OpenAI reply's message, as a client sends it back: null only
    audio: None = None
    function_call: None = None
    annotations: None = None


class ToolMessage(BaseModel):
    model_config = STRICT
    role: Literal["tool"]
    content: Content
    tool_call_id: str


MESSAGE_TAGS = {"system": "system-message", "developer": "system-message", "user": "user-message",
                "assistant": "assistant-message", "tool": "tool-message"}


def _message_tag(value) -> Optional[str]:
    role = value.get("role") if isinstance(value, dict) else getattr(value, "role", None)
    return MESSAGE_TAGS.get(role) if isinstance(role, str) else None


# One of the four shapes, chosen by the role (the tags, which no field name looks like, leave error locations)
Message = Annotated[Union[Annotated[SystemMessage, Tag("system-message")], Annotated[UserMessage, Tag("user-message")],
                          Annotated[AssistantTurn, Tag("assistant-message")],
                          Annotated[ToolMessage, Tag("tool-message")]],
                    Discriminator(_message_tag, custom_error_type="message_role",
                                  custom_error_message="the role must be system, developer, user, assistant or tool")]


class FunctionDefinition(BaseModel):
    model_config = STRICT
    name: FunctionName
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = Field(None, description="a JSON Schema object")
    strict: Optional[FalseOnly] = None


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionDefinition

    def schema(self) -> dict:
        """What the template lists for this tool: type and function (name, description, parameters as given)."""
        f = self.function
        return {"type": "function", "function": {k: v for k, v in (("name", f.name), ("description", f.description),
                                                                   ("parameters", f.parameters)) if v is not None}}


class NamedFunction(BaseModel):
    model_config = STRICT
    name: FunctionName


class NamedToolChoice(BaseModel):
    """tool_choice {"type": "function", "function": {"name": ...}}: the reply calls this function."""
    model_config = STRICT
    type: Literal["function"]
    function: NamedFunction


# "auto", "none", "required" or a named function; tagged by its JSON type, so an error names the branch it is about
ToolChoice = Annotated[Union[Annotated[Literal["auto", "none", "required"], Tag("tool-choice-mode")],
                             Annotated[NamedToolChoice, Tag("named-tool-choice")]],
                       Discriminator(lambda v: "tool-choice-mode" if isinstance(v, str) else "named-tool-choice")]


class ChatTemplateKwargs(BaseModel):
    model_config = STRICT
    enable_thinking: Optional[bool] = Field(None, description="open a <think> block for the reply (minimind-3)")
    open_thinking: Optional[bool] = Field(None, description="minimind-3's template's name for enable_thinking")


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False
    include_obfuscation: Optional[bool] = None  # ignored: no padding is added to chunks


class TextFormat(BaseModel):
    model_config = STRICT
    type: Literal["text"]


class ChatRequest(BaseModel):
    model_config = STRICT
    messages: List[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_completion_tokens: Optional[integer(ge=1)] = None
    max_tokens: Optional[integer(ge=1)] = Field(None, description="the older name of max_completion_tokens")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 = greedy")
    top_p: Optional[float] = Field(None, ge=0, le=1)
    top_k: Optional[integer(ge=0, le=MAX_TOP_K)] = Field(None, description="keep the k most likely tokens; 0 = all "
                                                                         "(vLLM's field)")
    repetition_penalty: Optional[float] = Field(None, ge=0.01, le=100, description="1 = off (vLLM's field); the "
                                                "range keeps penalised logits finite")
    seed: Optional[integer()] = Field(None, description="any integer (the sampler takes it modulo 2**64)")
    stop: Union[StopSequence, Annotated[List[StopSequence], Field(max_length=MAX_STOP_SEQUENCES)], None] = None
    tools: Optional[List[Tool]] = Field(None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: Optional[ToolChoice] = Field(
        None, description="none: the tools are not shown to the model and its reply is not read for calls; required "
                          "or a named function: the reply starts with a call (of that function)")
    parallel_tool_calls: Optional[bool] = Field(None, description="false: only the reply's first tool call is kept")
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high"]] = Field(
        None, description="none: thinking off; any other level: on (the model thinks at one level)")
    chat_template_kwargs: Optional[ChatTemplateKwargs] = None
    # limited to some values
    n: Optional[integer(ge=1, le=1)] = None
    frequency_penalty: Optional[float] = Field(None, ge=0, le=0)
    presence_penalty: Optional[float] = Field(None, ge=0, le=0)
    logprobs: Optional[FalseOnly] = None
    logit_bias: Optional[Dict[str, float]] = Field(None, max_length=0)
    response_format: Optional[TextFormat] = None
    modalities: Optional[List[Literal["text"]]] = None
    # ignored
    model: Optional[str] = None
    user: Optional[str] = None
    metadata: Optional[Dict[str, str]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None

    @classmethod
    def parse(cls, body: bytes) -> "ChatRequest":
        """The request in `body` (JSON bytes), or RequestError naming the first field at fault."""
        try:
            return cls.model_validate_json(body)
        except ValidationError as e:
            raise RequestError(*describe(e)) from None

    def conversation(self) -> List[dict]:
        """The messages as the chat template takes them (role, content, reasoning_content, tool_calls). The rules
        JSON Schema cannot say: a system message may only come first; a tool message answers a call of the
        assistant message before it (or before the tool messages before it); the last message is the user's or a
        tool result (the reply answers it)."""
        out, calls = [], set()  # calls: the ids the next tool message may answer
        for i, m in enumerate(self.messages):
            role = "system" if m.role == "developer" else m.role
            if role == "system" and i > 0:
                raise RequestError(f"messages[{i}]: a system message may only come first", f"messages[{i}].role")
            msg = {"role": role, "content": text_of(m.content)}
            if role == "assistant":
                if m.reasoning_content is not None:
                    msg["reasoning_content"] = m.reasoning_content
                if m.tool_calls:
                    msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
                calls = {c.id for c in m.tool_calls or []}
            elif role == "tool":
                if m.tool_call_id not in calls:
                    raise RequestError(f"messages[{i}]: a tool message must answer a tool call of the assistant "
                                       f"message before it (tool_call_id {m.tool_call_id!r} is none of "
                                       f"{sorted(calls)})", f"messages[{i}].tool_call_id")
                msg["tool_call_id"] = m.tool_call_id
            else:
                calls = set()
            out.append(msg)
        if out[-1]["role"] not in ("user", "tool"):
            raise RequestError(f"messages[{len(out) - 1}]: the last message must be the user's (or a tool result)",
                               f"messages[{len(out) - 1}].role")
        return out

    def thinking(self) -> bool:
        """Whether the reply opens with thinking: chat_template_kwargs.enable_thinking (or open_thinking), or
        reasoning_effort (none: off); off when neither says. RequestError when they disagree."""
        said = {}
        if self.chat_template_kwargs is not None:
            for key in ("enable_thinking", "open_thinking"):
                if getattr(self.chat_template_kwargs, key) is not None:
                    said[f"chat_template_kwargs.{key}"] = getattr(self.chat_template_kwargs, key)
        if self.reasoning_effort is not None:
            said["reasoning_effort"] = self.reasoning_effort != "none"
        if len(set(said.values())) > 1:
            raise RequestError(f"{' and '.join(said)} disagree on thinking", next(iter(said)))
        return any(said.values())

    def reads_tool_calls(self) -> bool:
        """Whether the reply is read for tool calls: tools are given and tool_choice is not none."""
        return bool(self.tools) and self.tool_choice != "none"

    def template_options(self, supports_tools: bool, supports_thinking: bool) -> dict:
        """The keyword arguments of tokenizer.apply_chat_template for this request (tools, enable_thinking);
        RequestError when the model's chat format cannot do what the request asks."""
        thinking = self.thinking()
        if not supports_thinking and thinking:
            field = "reasoning_effort" if self.reasoning_effort not in (None, "none") else "chat_template_kwargs"
            raise RequestError(f"'{field}': {MINIMIND2_FORMAT} cannot switch thinking on; a model with a minimind-3 "
                               "tokenizer can", field)
        if not supports_tools:
            if self.tools:
                raise RequestError(f"'tools': {MINIMIND2_FORMAT} has no tools; a model with a minimind-3 tokenizer "
                                   "has", "tools")
            for i, m in enumerate(self.messages):
                if m.role == "tool" or (m.role == "assistant" and m.tool_calls):
                    param = f"messages[{i}]" + (".tool_calls" if m.role == "assistant" else ".role")
                    raise RequestError(f"'{param}': {MINIMIND2_FORMAT} has no tool calls; a model with a "
                                       "minimind-3 tokenizer has", param)
        tools = [t.schema() for t in self.tools] if self.reads_tool_calls() else None
        return {"tools": tools, "enable_thinking": thinking}

    def reply_start(self, thinking: bool) -> str:
        """What the server writes at the start of the reply, after the prompt, for the model to go on from: '' unless
        tool_choice forces a call. "required": `<tool_call>\n{"name": "` (the model names one of the tools and
        writes its arguments); a named function: `<tool_call>\n{"name": "NAME", "arguments": ` (the model writes
        the arguments). minimind-3's template writes a call that way, so the model goes on as it was trained to.
        Nothing constrains the decoding after it: the call is read like any other, and one that does not parse stays
        in the content. RequestError when there are no tools, the named function is none of them, or thinking is on
        (the thinking would come first, and the server does not write into a reply midway)."""
        choice = self.tool_choice
        if choice is None or choice in ("auto", "none"):
            return ""
        if not self.tools:
            raise RequestError("'tool_choice': a forced tool call needs tools", "tool_choice")
        if thinking:
            raise RequestError("'tool_choice': a forced tool call needs thinking off (the reply would think first); "
                               "send tool_choice auto, or reasoning_effort none", "tool_choice")
        if choice == "required":
            return f'{TOOL_CALL}\n{{"name": "'
        names = [t.function.name for t in self.tools]
        if choice.function.name not in names:
            raise RequestError(f"'tool_choice.function.name': {choice.function.name!r} is none of the tools "
                               f"({', '.join(names)})", "tool_choice.function.name")
        return f'{TOOL_CALL}\n{{"name": "{choice.function.name}", "arguments": '

    def sampling(self, defaults: SamplingConfig, max_tokens_cap: int) -> SamplingConfig:
        """The server's defaults with this request's fields over them; the reply length capped at max_tokens_cap."""
        given = self.max_completion_tokens or self.max_tokens or defaults.max_new_tokens
        fields = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                      repetition_penalty=self.repetition_penalty)
        return replace(defaults, max_new_tokens=min(given, max_tokens_cap),
                       **{k: v for k, v in fields.items() if v is not None})

    def stop_sequences(self) -> List[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def describe(error: ValidationError):
    """(message, param) for pydantic's errors: the deepest one wins (for a union, the branch that got furthest;
    at equal depth a wrong value before an unknown field), its location written OpenAI's way."""
    found = [(_location(e), e) for e in error.errors(include_url=False)]
    loc, first = max(found, key=lambda f: (len(f[0]), f[1]["type"] != "extra_forbidden"))
    param = _param(loc) or None
    if first["type"] == "json_invalid":
        return f"the request body is not valid JSON: {first['ctx']['error']}", None
    if first["type"] == "model_type" and not loc:
        return "the request body must be a JSON object", None
    if first["type"] == "message_role":
        if not isinstance(first["input"], dict):
            return f"'{param}': a message must be a JSON object", param
        return f"'{param}.role': {first['msg']}", f"{param}.role"
    if first["type"] == "extra_forbidden":
        name = loc[-1]
        tag = next((p for p in first["loc"] if isinstance(p, str) and p.endswith("-message")), None)
        if tag and name in ROLE_FIELDS:
            return (f"'{param}': a {tag.split('-')[0]} message has no {name} (only {ROLE_FIELDS[name]} messages "
                    "do)"), param
        reason = NOT_SUPPORTED.get(name)
        return (f"'{param}' is not supported: {reason}" if reason else
                f"unrecognized request argument supplied: '{param}'"), param
    if loc and loc[0] in LIMITED:  # a top-level field: named as a whole
        return f"'{loc[0]}': {LIMITED[loc[0]]}", loc[0]
    if loc and loc[-1] in LIMITED:  # tools[i].function.strict
        return f"'{param}': {LIMITED[loc[-1]]}", param
    messages = dict.fromkeys(e["msg"] for l, e in found if l == loc)  # a union's branches at the same place
    return f"'{param}': {' or '.join(messages)}", param


def _location(error):
    """pydantic's location of an error without its union-branch tags ('str', 'constrained-str', 'list[TextPart]',
    'user-message'), which no field name here looks like; an unknown field's own name is kept, whatever it looks
    like."""
    loc = error["loc"]
    keep_from = len(loc) - 1 if error["type"] == "extra_forbidden" else len(loc)
    return tuple(p for i, p in enumerate(loc)
                 if i >= keep_from or isinstance(p, int) or not (p == "str" or "[" in p or "-" in p))


def _param(loc) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


# ---- the objects the server answers with (OpenAPI documents them; the tests check replies against them) ----

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "minimind"
    capabilities: List[Literal["thinking", "tools"]] = Field(
        default_factory=list, description="what the model's chat format can do (minimind-3's: both)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="a JSON object, as a string")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = Field(description="null when the reply is only tool calls")
    reasoning_content: Optional[str] = Field(None, description="the thinking, apart from the answer (minimind-3)")
    tool_calls: Optional[List[ToolCall]] = None


FinishReason = Literal["stop", "length", "tool_calls"]


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: List[Choice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class ToolCallDelta(BaseModel):
    """A tool call in a stream: here each comes whole, in one chunk (index, id, type, name and arguments)."""
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[FunctionCallDelta] = None


class ChunkDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[List[ToolCallDelta]] = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: Optional[FinishReason]


class ChatCompletionChunk(BaseModel):
    """One event of a streamed reply; `usage` is there only with stream_options.include_usage (null until the last
    chunk, which has no choices)."""
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: List[ChunkChoice]
    usage: Optional[Usage] = None


class ReplyShaper:
    """A generated reply as OpenAI's assistant message (whole) or its deltas (streamed), read by a ReplyReader
    (minimind.chat_template): the thinking apart when the model's format has it (think_tags), the reply read for
    tool calls when the request offers tools, only the first call kept with parallel_tool_calls false. The deltas
    joined are the message, however the text arrived."""

    def __init__(self, request: ChatRequest, think_tags: bool, thinking_open: bool, reply_start: str = ""):
        """reply_start: what the server wrote at the start of the reply (ChatRequest.reply_start), read first."""
        self.reader = ReplyReader(thinking_open, think_tags, request.reads_tool_calls())
        self.max_calls = 1 if request.parallel_tool_calls is False else None
        self.calls = 0
        self.pending = self._deltas(self.reader.feed(reply_start))  # none for a call's opening: it waits for its end

    def feed(self, piece: str) -> List[dict]:
        """The deltas the text so far makes certain."""
        out, self.pending = self.pending + self._deltas(self.reader.feed(piece)), []
        return out

    def close(self) -> List[dict]:
        """The deltas of the text held back, at the end of the reply."""
        return self._deltas(self.reader.close())

    def _deltas(self, events) -> List[dict]:
        out = []
        for kind, value in events:
            if kind != "tool_call":
                out.append({"reasoning_content" if kind == "reasoning" else "content": value})
            elif self.max_calls is None or self.calls < self.max_calls:
                out.append({"tool_calls": [{"index": self.calls, **value}]})
                self.calls += 1
        return out

    def finish_reason(self, finish_reason: str) -> str:
        """The generator's reason ("stop" or "length"); "tool_calls" for a reply that ended with calls."""
        return "tool_calls" if self.calls and finish_reason == "stop" else finish_reason

    def message(self, text: str) -> dict:
        """The whole reply `text` as the choice's message."""
        parts = {"content": [], "reasoning_content": [], "tool_calls": []}
        for delta in self.feed(text) + self.close():
            for key, value in delta.items():
                parts[key] += value if key == "tool_calls" else [value]
        calls = [{k: v for k, v in c.items() if k != "index"} for c in parts["tool_calls"]]
        content = "".join(parts["content"])
        return {"role": "assistant", "content": content if content or not calls else None,
                "reasoning_content": "".join(parts["reasoning_content"]) or None, "tool_calls": calls or None}


def stream_event_schema(ref) -> dict:
    """A server-sent event of a streamed reply: its data is a chunk, an error (a failure after the stream started)
    or the final [DONE]. `ref(model)` is the schema reference to a model."""
    payload = {"anyOf": [ref(ChatCompletionChunk), ref(ErrorResponse)]}
    return {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"const": "[DONE]"}, {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}]}}}

