"""Chat formats: how a conversation becomes text (MiniMind2 and minimind-3), and how a generated reply is read back.

Each format is the exact equivalent of a Jinja `chat_template` (kept verbatim below: a data-format fact, written
into the tokenizer_config.json of every folder we save, so transformers renders what we train on):

  minimind2  MiniMind2's ChatML. A system turn always (the first message's, else "You are a helpful assistant");
             each user turn also opens the assistant turn; assistant content as is. No tools, no thinking switch.
  minimind3  minimind-3's Qwen3-style template. No default system turn. With `tools`, a system turn lists them
             in <tools></tools> after the user's system text. Every assistant turn is
             `<|im_start|>assistant\\n<think>\\n{reasoning}\\n</think>\\n\\n{content}` (reasoning from
             `reasoning_content`, else from a `<think>...</think>` prefix of the content, else empty), then its
             `tool_calls` as `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>` blocks; consecutive `tool`
             messages share one user turn of `<tool_response>` blocks. The generation prompt is
             `<|im_start|>assistant\\n<think>\\n` with thinking on, `...<think>\\n\\n</think>\\n\\n` with it off.
             (The Jinja's switch is named `open_thinking`; our API calls it `enable_thinking` and takes both.)

    render(fmt, messages, tools=None, add_generation_prompt=False, thinking=False) -> (text, assistant spans)

The spans are byte ranges [start, end) of each assistant turn's target: from after `<|im_start|>assistant\\n` through
`<|im_end|>\\n` (the SFT loss mask). Messages are dicts as in the OpenAI API: role, content, reasoning_content,
tool_calls (a list of {"name", "arguments"} or {"type": "function", "function": {...}}; arguments an object or a
JSON string). A reply of the model is read back with

    ReplyReader(thinking_open=False, think_tags=True, tool_calls=True)   .feed(piece) / .close() -> events, as
        the reply streams in: ("reasoning", text), ("content", text), ("tool_call", OpenAI tool call)
    parse_reply(text, thinking_open=False, ...) -> Reply    the same on a whole reply; Reply.message() renders back
        to the same text
    split_thinking(text, thinking_open=False) -> (reasoning, answer);  parse_tool_calls(text) -> (content, calls,
        invalid blocks)
"""
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
TOOL_RESPONSE, END_TOOL_RESPONSE = "<tool_response>", "</tool_response>"
EMPTY_THINK = "<think>\n\n</think>\n\n"  # the block of a turn without reasoning (dropped by an SFT augmentation)
DEFAULT_SYSTEM = "You are a helpful assistant"  # MiniMind2's

# MiniMind2's chat template, verbatim: the user turn already opens the assistant turn.
MINIMIND2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{{ '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'user' %}{{ '<|im_start|>user\\n' + content + '<|im_end|>\\n<|im_start|>assistant\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ content + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
)

# minimind-3's chat template, verbatim (tokenizer_config.json of its tokenizer folder).
MINIMIND3_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with \
function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n\
</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and \
not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1]\
.lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if true %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' \
+ content.lstrip('\\n') }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if open_thinking is defined and open_thinking is true %}
        {{- '<think>\\n' }}
    {%- else %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
              "function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
              "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
              "<args-json-object>}\n</tool_call><|im_end|>\n")


def tojson(x) -> str:
    """The `tojson` filter of transformers' template environment (not Jinja's: no key sorting, no HTML escapes)."""
    return json.dumps(x, ensure_ascii=False)


class _Text:
    """Text built piece by piece, with the byte spans of the assistant targets."""

    def __init__(self):
        self.parts, self.spans, self.nbytes = [], [], 0

    def put(self, s: str):
        self.parts.append(s)
        self.nbytes += len(s.encode("utf-8"))

    def result(self) -> Tuple[str, List[Tuple[int, int]]]:
        return "".join(self.parts), self.spans


def _content(m) -> str:
    c = m.get("content")
    return c if isinstance(c, str) else ""


def render_minimind2(messages, tools=None, add_generation_prompt=False, thinking=False):
    if tools:
        raise ValueError("the minimind2 chat format (MiniMind2's ChatML) has no tools; a minimind-3 tokenizer does")
    out = _Text()
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else DEFAULT_SYSTEM
    out.put(f"{BOS}system\n{system}{EOS}\n")
    for m in messages:  # the template ignores every other role
        if m["role"] == "user":
            out.put(f"{BOS}user\n{m['content']}{EOS}\n{BOS}assistant\n")
        elif m["role"] == "assistant":
            start = out.nbytes
            out.put(f"{m['content']}{EOS}\n")
            out.spans.append((start, out.nbytes))
    return out.result()


def tool_call_text(call) -> str:
    if not isinstance(call, dict):
        raise TypeError(f"a tool call must be an object, got {type(call).__name__} (parse JSON strings first)")
    if call.get("function"):
        call = call["function"]
    args = call.get("arguments")
    return (f'{TOOL_CALL}\n{{"name": "{call.get("name")}", "arguments": '
            f'{args if isinstance(args, str) else tojson(args)}}}\n{END_TOOL_CALL}')


def render_minimind3(messages, tools=None, add_generation_prompt=False, thinking=False):
    out = _Text()
    has_system = bool(messages) and messages[0]["role"] == "system"
    if tools:
        out.put(f"{BOS}system\n" + (messages[0]["content"] + "\n\n" if has_system else "") + TOOLS_HEAD)
        for tool in tools:
            out.put("\n" + tojson(tool))
        out.put(TOOLS_TAIL)
    elif has_system:
        out.put(f"{BOS}system\n{messages[0]['content']}{EOS}\n")
    last = len(messages) - 1
    for i, m in enumerate(messages):
        role, content = m["role"], _content(m)
        if role == "user" or (role == "system" and i > 0):
            out.put(f"{BOS}{role}\n{content}{EOS}\n")
        elif role == "assistant":
            reasoning = m.get("reasoning_content")
            if not isinstance(reasoning, str):
                reasoning = ""
                if END_THINK in content:
                    reasoning = content.split(END_THINK)[0].rstrip("\n").split(THINK)[-1].lstrip("\n")
                    content = content.split(END_THINK)[-1].lstrip("\n")
            out.put(f"{BOS}assistant\n")
            start = out.nbytes
            out.put(f"{THINK}\n{reasoning.strip(chr(10))}\n{END_THINK}\n\n{content.lstrip(chr(10))}")
            calls = m.get("tool_calls") or []
            if isinstance(calls, str):
                raise TypeError(f"message {i}: tool_calls must be a list (parse the JSON string first)")
            for j, call in enumerate(calls):
                if j > 0 or content:
                    out.put("\n")
                out.put(tool_call_text(call))
            out.put(f"{EOS}\n")
            out.spans.append((start, out.nbytes))
        elif role == "tool":
            if i == 0 or messages[i - 1]["role"] != "tool":
                out.put(f"{BOS}user")
            out.put(f"\n{TOOL_RESPONSE}\n{content}\n{END_TOOL_RESPONSE}")
            if i == last or messages[i + 1]["role"] != "tool":
                out.put(f"{EOS}\n")
        elif role != "system":
            raise ValueError(f"message {i} has role {role!r}; the minimind3 chat format knows system, user, "
                             f"assistant and tool")
    if add_generation_prompt:
        out.put(f"{BOS}assistant\n" + (f"{THINK}\n" if thinking else EMPTY_THINK))
    return out.result()


@dataclass(frozen=True)
class ChatFormat:
    """A chat format: its Jinja template, its renderer, and the added tokens of its tokenizers (ids 0, 1, ...; the
    first `num_special` are special: decode(skip_special_tokens=True) drops them)."""
    name: str
    template: str
    render: Callable
    added_tokens: Tuple[str, ...]
    num_special: int
    supports_thinking: bool
    supports_tools: bool
    template_tokens: Tuple[str, ...] = ()  # tokens the template writes, which a tokenizer must have as added tokens
    config_extra: Dict = field(default_factory=dict)  # more tokenizer_config.json fields


MINIMIND3_SPECIAL = (PAD, BOS, EOS, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                     "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                     "<|image_pad|>", "<|video_pad|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
                     "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>")  # ids 0-20
MINIMIND3_TEMPLATE_TOKENS = (TOOL_CALL, END_TOOL_CALL, TOOL_RESPONSE, END_TOOL_RESPONSE, THINK, END_THINK)  # 21-26

FORMATS = {
    "minimind2": ChatFormat("minimind2", MINIMIND2_TEMPLATE, render_minimind2, (PAD, BOS, EOS), 3,
                            supports_thinking=False, supports_tools=False,
                            config_extra={"additional_special_tokens": [], "model_max_length": 32768}),
    "minimind3": ChatFormat(
        "minimind3", MINIMIND3_TEMPLATE, render_minimind3,
        MINIMIND3_SPECIAL + MINIMIND3_TEMPLATE_TOKENS + tuple(f"<|buffer{i}|>" for i in range(1, 10)),
        len(MINIMIND3_SPECIAL), supports_thinking=True, supports_tools=True,
        template_tokens=MINIMIND3_TEMPLATE_TOKENS,
        config_extra={"additional_special_tokens": list(MINIMIND3_SPECIAL[1:]), "model_max_length": 131072,
                      "image_token": "<|image_pad|>", "audio_token": "<|audio_pad|>", "video_token": "<|video_pad|>",
                      "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
                      "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>"}),
}


def get_format(name: str) -> ChatFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown chat format {name!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[name]


def detect_format(chat_template: Optional[str], vocab: Dict[str, int], where: str = "") -> ChatFormat:
    """The format of a tokenizer folder: the one whose template its tokenizer_config.json holds; without a template,
    minimind3 when the tokenizer has every token that format's template writes, else minimind2."""
    if chat_template is not None:
        for fmt in FORMATS.values():
            if chat_template == fmt.template:
                return fmt
        raise ValueError(f"{where or 'tokenizer_config.json'}: its chat_template is neither MiniMind2's nor "
                         f"minimind-3's, the two this trainer renders exactly (remove it to choose by the tokens)")
    m3 = FORMATS["minimind3"]
    return m3 if all(t in vocab for t in m3.template_tokens) else FORMATS["minimind2"]


def render(fmt: ChatFormat, messages: Sequence[dict], tools=None, add_generation_prompt=False, thinking=False):
    """(text, assistant byte spans) of `messages` in format `fmt`; see the module docstring."""
    return fmt.render(list(messages), tools, add_generation_prompt, thinking)


# ---------------------------------------------------------------------------------------------- reading a reply

def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _held(text: str, tag: str) -> int:
    """Length of the longest end of `text` that may be the start of `tag` (a proper prefix of it)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReplyReader:
    """Reads a generated reply as it streams in: feed(piece) returns what the text so far makes certain, close()
    the rest; joined, the events are the same whatever the pieces (parse_reply reads a whole text with one).

    Events are (kind, value): ("reasoning", text), ("content", text), ("tool_call", {"id", "type": "function",
    "function": {"name", "arguments": JSON string}}). Text that may still turn out to be (part of) a tag, and newlines
    that a tag would swallow, wait until they are decided. The rules (the inverse of minimind-3's template):

      thinking   thinking_open (the prompt ended with `<think>\\n`): the reply starts in its reasoning; else a
                 reply that starts (after newlines) with `<think>` does; any other reply has no reasoning. The
                 reasoning runs to the first `</think>` (to the end if there is none: a reply cut short), newlines
                 stripped at both ends; the answer is what follows, leading newlines dropped. think_tags=False
                 (MiniMind2's format): no thinking, all is answer.
      tool calls each `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` block of the answer that parses
                 (JSON object, a string "name", arguments an object or a JSON string of one) becomes a tool call and
                 leaves the content with the newlines on either side of it; a block that does not parse, or a
                 `<tool_call>` never closed, stays in the content and is listed in `invalid`.
                 tool_calls=False: no blocks are read.
    """

    def __init__(self, thinking_open: bool = False, think_tags: bool = True, tool_calls: bool = True,
                 make_id: Callable[[], str] = new_call_id):
        self.state = "content" if not think_tags else "reasoning" if thinking_open else "start"
        self.read_calls, self.make_id = tool_calls, make_id
        self.buf = ""  # text not yet decided
        self.strip = self.state == "reasoning"  # drop the newlines that open the current part
        self.calls: List[dict] = []
        self.invalid: List[str] = []

    def feed(self, piece: str) -> List[tuple]:
        self.buf += piece
        return self._run(final=False)

    def close(self) -> List[tuple]:
        """The events of the text held back (the reply is complete)."""
        return self._run(final=True)

    def _run(self, final: bool) -> List[tuple]:
        out = []
        while getattr(self, "_" + self.state)(out, final):
            pass
        merged = []
        for kind, value in out:
            if merged and kind != "tool_call" and merged[-1][0] == kind:
                merged[-1] = (kind, merged[-1][1] + value)
            elif value or kind == "tool_call":
                merged.append((kind, value))
        return merged

    def _lstrip(self):
        if self.strip:
            self.buf = self.buf.lstrip("\n")
            self.strip = not self.buf

    def _emit_until(self, out, kind, keep: int):
        """Emit the buffer but its last `keep` characters and the newlines just before them."""
        body = self.buf[:len(self.buf) - keep].rstrip("\n")
        out.append((kind, body))
        self.buf = self.buf[len(body):]

    def _start(self, out, final) -> bool:  # does the reply open with <think>?
        rest = self.buf.lstrip("\n")
        if rest.startswith(THINK):
            self.buf, self.state, self.strip = rest[len(THINK):], "reasoning", True
            return True
        if not final and THINK.startswith(rest):  # only newlines, or a part of <think>, so far
            return False
        self.state = "content"
        return True

    def _reasoning(self, out, final) -> bool:
        self._lstrip()
        i = self.buf.find(END_THINK)
        if i >= 0:
            out.append(("reasoning", self.buf[:i].rstrip("\n")))
            self.buf, self.state, self.strip = self.buf[i + len(END_THINK):], "content", True
            return True
        self._emit_until(out, "reasoning", 0 if final else _held(self.buf, END_THINK))
        if final:
            self.buf = ""
        return False

    def _content(self, out, final) -> bool:
        self._lstrip()
        i = self.buf.find(TOOL_CALL) if self.read_calls else -1
        if i < 0:
            if final or not self.read_calls:
                out.append(("content", self.buf))
                self.buf = ""
            else:
                self._emit_until(out, "content", _held(self.buf, TOOL_CALL))
            return False
        j = self.buf.find(END_TOOL_CALL, i + len(TOOL_CALL))
        if j < 0:  # an open block: wait for its end (a reply that ends inside it keeps it as content)
            if final:
                self.invalid.append(self.buf[i:])
                out.append(("content", self.buf))
                self.buf = ""
            else:
                self._emit_until(out, "content", len(self.buf) - i)
            return False
        end = j + len(END_TOOL_CALL)
        call = _parse_call(self.buf[i + len(TOOL_CALL):j])
        if call is None:
            self.invalid.append(self.buf[i:end])
            out.append(("content", self.buf[:end]))
        else:
            out.append(("content", self.buf[:i].rstrip("\n")))
            call = {"id": self.make_id(), "type": "function", "function": call}
            self.calls.append(call)
            out.append(("tool_call", call))
            self.strip = True
        self.buf = self.buf[end:]
        return True


def _parse_call(body: str) -> Optional[dict]:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"name": obj["name"], "arguments": tojson(args)}


@dataclass
class Reply:
    """A generated assistant reply, read: the answer, the reasoning ('' when none), OpenAI-style tool calls and the
    text of the tool-call blocks that did not parse."""
    content: str
    reasoning_content: str = ""
    tool_calls: List[dict] = field(default_factory=list)
    invalid_tool_calls: List[str] = field(default_factory=list)

    def message(self) -> dict:
        """The OpenAI assistant message (tool_calls only when there are some)."""
        msg = {"role": "assistant", "content": self.content, "reasoning_content": self.reasoning_content}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


def read_events(events) -> Reply:
    """The Reply of a ReplyReader's events (all of them, close() included)."""
    text = {"reasoning": [], "content": []}
    calls = []
    for kind, value in events:
        calls.append(value) if kind == "tool_call" else text[kind].append(value)
    return Reply("".join(text["content"]), "".join(text["reasoning"]), calls)


def parse_reply(text: str, thinking_open: bool = False, think_tags: bool = True, tool_calls: bool = True,
                make_id: Callable[[], str] = new_call_id) -> Reply:
    """The Reply of a whole generated reply (ReplyReader's rules). `text` is the decoded reply after the generation
    prompt, with `<think>`/`</think>`/`<tool_call>` kept (they are not special tokens in minimind-3's tokenizer)."""
    reader = ReplyReader(thinking_open, think_tags, tool_calls, make_id)
    reply = read_events(reader.feed(text) + reader.close())
    reply.invalid_tool_calls = reader.invalid
    return reply


def split_thinking(text: str, thinking_open: bool = False) -> Tuple[str, str]:
    """(reasoning, answer) of a generated reply; no tool calls read."""
    reply = parse_reply(text, thinking_open, tool_calls=False)
    return reply.reasoning_content, reply.content


def parse_tool_calls(text: str, make_id: Callable[[], str] = new_call_id):
    """(content, tool_calls (OpenAI style), invalid blocks) of an answer (no thinking read)."""
    reply = parse_reply(text, think_tags=False, make_id=make_id)
    return reply.content, reply.tool_calls, reply.invalid_tool_calls
