"""OpenAI's chat-completions API as minimind.serve speaks it: the request it takes and the objects it answers with.

A request is parsed by pydantic straight from the body's bytes (`ChatRequest.parse`), so the JSON parser's own
limits answer the hostile cases with a 400 instead of an exception: integers past 4300 digits, nesting deeper than
200 levels, NaN and Infinity (not JSON), lone surrogates and bytes that are not UTF-8. Types are strict (1.5 is not a
max_tokens, "1" is not a temperature) and ranges are OpenAI's.

Fields fall into four groups:
    used      messages, stream, stream_options.include_usage, max_completion_tokens (or max_tokens), temperature,
              top_p, seed, stop, and two of vLLM's: top_k, repetition_penalty
    ignored   model (one model is served), user, metadata, store, service_tier, parallel_tool_calls,
              prompt_cache_key, safety_identifier, messages[].name: ignoring them changes no reply
    neutral   n, frequency_penalty, presence_penalty, logprobs, logit_bias, response_format, modalities: taken
              only at the value that asks for nothing this server lacks (n = 1, penalties 0, text output)
    refused   everything else, by name: tools, tool_choice, reasoning_effort, ... and unknown fields
An error names the field OpenAI's way (`messages[2].content`, `max_completion_tokens`).
"""
from dataclasses import replace
from typing import Annotated, Dict, List, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema

from minimind.generate import SamplingConfig

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # each (the reply is searched for every stop sequence after every token)
MAX_TOP_K = 1 << 20  # past any vocabulary: "all tokens", in a number a tensor can hold

# Fields OpenAI has and this server refuses, with the reason given to the client.
NOT_SUPPORTED = {
    **dict.fromkeys(("tools", "tool_choice", "functions", "function_call", "tool_calls"),
                    "tool calls are not supported yet (they come with minimind-3's chat format)"),
    "reasoning_effort": "thinking is not supported yet (it comes with minimind-3's chat format)",
    "top_logprobs": "log-probabilities are not returned",
    "audio": "only text is generated",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
}
# Fields taken only at their neutral value, and what to say when another value comes.
NEUTRAL_ONLY = {
    "n": "only one choice per request (n = 1) is generated",
    "frequency_penalty": "only 0 is supported; repetition_penalty is this server's penalty",
    "presence_penalty": "only 0 is supported; repetition_penalty is this server's penalty",
    "logprobs": "log-probabilities are not returned (logprobs must be false)",
    "logit_bias": "logit_bias is not supported (only an empty object)",
    "response_format": "only {\"type\": \"text\"} is supported",
    "modalities": "only [\"text\"] is supported",
}


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


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: Union[str, List[TextPart]]
    name: Optional[str] = None  # ignored: MiniMind's chat template has no names

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


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
    # neutral values only
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
    parallel_tool_calls: Optional[bool] = None
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
        """The messages as {role, content} for the chat template: a system message may only come first, and the
        last message is the user's (the reply answers it)."""
        out = []
        for i, m in enumerate(self.messages):
            role = "system" if m.role == "developer" else m.role
            if role == "system" and i > 0:
                raise RequestError(f"messages[{i}]: a system message may only come first", f"messages[{i}].role")
            out.append({"role": role, "content": m.text()})
        if out[-1]["role"] != "user":
            raise RequestError(f"messages[{len(out) - 1}]: the last message must be the user's",
                               f"messages[{len(out) - 1}].role")
        return out

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
    if first["type"] == "extra_forbidden":
        reason = NOT_SUPPORTED.get(loc[-1])
        return (f"'{param}' is not supported: {reason}" if reason else
                f"unrecognized request argument supplied: '{param}'"), param
    if loc and loc[0] in NEUTRAL_ONLY:
        return f"'{loc[0]}': {NEUTRAL_ONLY[loc[0]]}", loc[0]
    messages = dict.fromkeys(e["msg"] for l, e in found if l == loc)  # a union's branches at the same place
    return f"'{param}': {' or '.join(messages)}", param


def _location(error):
    """pydantic's location of an error without its union-branch tags ('str', 'constrained-str', 'list[TextPart]'),
    which no field name here looks like; an unknown field's own name is kept, whatever it looks like."""
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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
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


class ChunkDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: Optional[Literal["stop", "length"]]


class ChatCompletionChunk(BaseModel):
    """One event of a streamed reply; `usage` is there only with stream_options.include_usage (null until the last
    chunk, which has no choices)."""
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: List[ChunkChoice]
    usage: Optional[Usage] = None


def stream_event_schema(ref) -> dict:
    """A server-sent event of a streamed reply: its data is a chunk, an error (a failure after the stream started)
    or the final [DONE]. `ref(model)` is the schema reference to a model."""
    payload = {"anyOf": [ref(ChatCompletionChunk), ref(ErrorResponse)]}
    return {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"const": "[DONE]"}, {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}]}}}

