"""Talk to a trained model in the terminal.

    python -m minimind.chat full_sft                       # out/full_sft_<hidden>.pth, chat template
    python -m minimind.chat out/reason_512.pth --prompt "2+3=?"   # one question, answer, exit
    python -m minimind.chat pretrain --mode text           # a pretrained model continues plain text
    python -m minimind.chat full_sft --lora out/lora/lora_identity_512.pth
    python -m minimind.chat full_sft --think on            # minimind-3: think before answering
    python -m minimind.chat full_sft --tools my_tools.py   # minimind-3: let the model call my_tools.py's functions

Modes: `chat` renders the tokenizer's chat template (MiniMind2's ChatML, or minimind-3's with thinking and tools;
SFT, DPO, reasoning and distilled models); `text` feeds <|im_start|> + the prompt and lets the model continue
(pretrained models, which never saw the template).
Thinking (minimind-3): `--think on` opens a <think> block for every reply (off: the template's empty block); the
reasoning is shown apart from the answer, dimmed on a terminal, else between <think> and </think> lines; a model
that thinks unasked is shown the same way. `/think on` or `/think off` switches it mid-chat.
Tools (minimind-3): `--tools FILE` offers the model the public functions of a Python file, their schemas read off
their signatures and docstrings (minimind/tools.py). Each call the model makes is shown, run, and its result fed
back as a tool message; the model then goes on, for at most --max_tool_rounds rounds of calls per question.
Each line typed is one user turn; `--history N` keeps the last N exchanges as context (0, MiniMind2's default,
makes every question stand alone); `/reset` clears it; an empty line or end of input quits. On a terminal the
arrow keys edit the line and recall earlier ones. Ctrl-C stops a reply (it is not kept in the history); at the
prompt it quits.
"""
import argparse
import itertools
import os
import sys
from dataclasses import dataclass
from typing import List, Optional

import torch

from minimind.chat_template import Reply, ReplyReader, read_events
from minimind.generate import SamplingConfig, stream_text
from minimind.tools import Toolbox
from minimind.weights import find_weights, load_model, load_tokenizer_for


def add_model_args(p: argparse.ArgumentParser):
    """The flags that say which model to open (shared by minimind.chat and minimind.serve)."""
    p.add_argument("weights", help="a weight file, or a stage prefix (pretrain, full_sft, rlhf, reason, ...) "
                                   "looked up in --out_dir")
    p.add_argument("--out_dir", default="out", help="where a stage prefix is looked up (default %(default)s)")
    p.add_argument("--lora", default=None, help="a LoRA adapter file to merge into the weights")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: the one the weights' .json card names, else the bundled one)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default %(default)s here)")
    p.add_argument("--kernels", default="torch", choices=("torch", "triton", "liger"),
                   help="op backend (triton: the fused kernels, on a GPU)")
    p.add_argument("--num_attention_heads", type=int, default=None,
                   help="only for a weight file without its .json config (then default 8, as in MiniMind2)")


def add_sampling_args(p: argparse.ArgumentParser):
    d = SamplingConfig()
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="sampling temperature; 0 = greedy, the same answer every time (default %(default)s)")
    p.add_argument("--top_p", type=float, default=d.top_p,
                   help="sample from the most likely tokens whose probabilities add up to P (1 = off; default "
                        "%(default)s)")
    p.add_argument("--top_k", type=int, default=d.top_k,
                   help="sample from the K most likely tokens only (0 = all; default %(default)s)")
    p.add_argument("--repetition_penalty", type=float, default=d.repetition_penalty,
                   help="a token already in the text has its logit divided by this (multiplied if the logit is "
                        "negative; 1 = off, default %(default)s)")
    p.add_argument("--max_new_tokens", type=int, default=512, help="longest reply in tokens (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed the sampler (same seed, same reply)")


def open_model(args):
    """(model, tokenizer) from the model flags; errors say which file or flag is wrong."""
    path = find_weights(args.weights, args.out_dir)
    tokenizer = load_tokenizer_for(path, args.tokenizer)
    model = load_model(path, lora=args.lora, kernels=args.kernels, device=args.device,
                       num_attention_heads=args.num_attention_heads)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but {path} only {model.config.vocab_size}; "
                         f"pass the --tokenizer it was trained with")
    return model, tokenizer, path


def sampling_config(args) -> SamplingConfig:
    """The SamplingConfig of add_sampling_args' flags."""
    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, repetition_penalty=args.repetition_penalty)


def number_at_least(kind, low, inclusive=True):
    """An argparse type: a number of `kind` >= low (> low when not inclusive)."""
    def parse(text):
        value = kind(text)
        if not (value >= low if inclusive else value > low):  # (NaN is neither)
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low}, got {text}")
        return value
    return parse


def parse_and_open(p: argparse.ArgumentParser, argv=None):
    """Parse the flags and open the model: (args, model, tokenizer, weight path, SamplingConfig); a bad file or flag
    ends with a usage error that says which."""
    args = p.parse_args(argv)
    try:
        model, tokenizer, path = open_model(args)
        cfg = sampling_config(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # RuntimeError: an unavailable --kernels
        p.error(str(e))
    return args, model, tokenizer, path, cfg


class Display:
    """A reply written as it streams: the reasoning apart from the answer (dimmed when `color`, else between
    <think> and </think> lines), each tool call and result on a line of its own."""
    DIM, CALL, RESET = "\033[2m", "\033[36m", "\033[0m"

    def __init__(self, out, color: bool):
        self.out, self.color = out, color
        self.thinking, self.line_start, self.after_line = False, True, False

    def write(self, text: str):
        if text:
            self.out.write(text)
            self.out.flush()
            self.line_start, self.after_line = text.endswith("\n"), False

    def show(self, event):
        """One ReplyReader event."""
        kind, value = event
        if kind == "reasoning" and not self.thinking:
            self.thinking = True
            self.write(self.DIM if self.color else "<think>\n")
        elif kind != "reasoning":
            self.end_thinking()
        if kind == "tool_call":
            self.line(f"[call] {value['function']['name']}({value['function']['arguments']})", self.CALL)
        else:
            self.write(value)

    def end_thinking(self):
        if self.thinking:
            self.thinking = False
            self.write(self.RESET + "\n" if self.color else ("" if self.line_start else "\n") + "</think>\n")

    def line(self, text: str, style: str = ""):
        """`text` on a line of its own."""
        self.end_thinking()
        if not self.line_start:
            self.write("\n")
        self.write((style + text + self.RESET if self.color and style else text) + "\n")
        self.after_line = True

    def end(self):
        """The reply is over: end its line (unless a line of its own just did)."""
        self.end_thinking()
        if not self.after_line:
            self.write("\n")

    def stopped(self):
        """The reply was interrupted."""
        if self.thinking and self.color:
            self.write(self.RESET)
        self.thinking = False
        self.write(" [stopped]\n")


@dataclass
class Session:
    """What a conversation is generated with."""
    model: object
    tokenizer: object
    cfg: SamplingConfig
    generator: Optional[torch.Generator] = None
    thinking: bool = False
    toolbox: Optional[Toolbox] = None
    max_tool_rounds: int = 3


def reply(session: Session, messages, display: Display) -> Reply:
    """Generate the assistant's reply to `messages`, showing it on `display` as it comes; the reply, read."""
    tok = session.tokenizer
    tools = session.toolbox.schemas if session.toolbox else None
    prompt = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                     enable_thinking=session.thinking)
    reader = ReplyReader(session.thinking, tok.supports_thinking, tool_calls=session.toolbox is not None)
    events = []
    for piece in stream_text(session.model, tok, tok.encode(prompt), session.cfg, session.generator):
        for event in reader.feed(piece):
            display.show(event)
            events.append(event)
    for event in reader.close():
        display.show(event)
        events.append(event)
    display.end()
    return read_events(events)


def answer(session: Session, messages, display: Display) -> List[dict]:
    """The messages that answer the conversation `messages` (which ends with the user's): the assistant's reply,
    and while it calls tools (at most session.max_tool_rounds times), the tools' results and its next reply."""
    turn = []
    for rounds in itertools.count():
        r = reply(session, messages + turn, display)
        turn.append(r.message())
        if not r.tool_calls:
            return turn
        if rounds == session.max_tool_rounds:
            display.line(f"[stopped: {rounds} rounds of tool calls, --max_tool_rounds]")
            return turn
        for result in session.toolbox.respond(r.tool_calls):
            display.line(f"[result] {result['content']}", Display.CALL)
            turn.append(result)


def enable_line_editing():
    """Arrow keys edit the line and recall earlier lines: input() uses GNU readline once it is imported."""
    try:
        import readline  # noqa: F401
    except ImportError:  # a Python built without it
        pass


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minimind.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--mode", choices=("chat", "text"), default="chat",
                   help="chat: the tokenizer's chat template (SFT and later models); text: continue the prompt "
                        "(pretrained)")
    p.add_argument("--system", default=None, help="a system message (chat mode)")
    p.add_argument("--history", type=int, default=0, help="earlier exchanges kept as context (chat mode)")
    p.add_argument("--prompt", action="append", default=None,
                   help="ask this and exit instead of reading input (repeat for several turns)")
    p.add_argument("--think", choices=("on", "off"), default=None,
                   help="think before answering (minimind-3's chat template; default off)")
    p.add_argument("--tools", default=None, metavar="FILE",
                   help="a Python file whose public functions the model may call (minimind-3's chat template)")
    p.add_argument("--max_tool_rounds", type=number_at_least(int, 0), default=3,
                   help="rounds of tool calls answered per question (default %(default)s)")
    args, model, tokenizer, path, cfg = parse_and_open(p, argv)
    fmt = f"the tokenizer speaks MiniMind2's chat format, which has no %s (a minimind-3 tokenizer has: --tokenizer)"
    if args.think is not None and (args.mode == "text" or not tokenizer.supports_thinking):
        p.error("--think: " + ("text mode has no chat template" if args.mode == "text" else fmt % "thinking switch"))
    toolbox = None
    if args.tools is not None:
        if args.mode == "text" or not tokenizer.supports_tools:
            p.error("--tools: " + ("text mode has no chat template" if args.mode == "text" else fmt % "tools"))
        try:
            toolbox = Toolbox.from_file(args.tools)
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
    session = Session(model, tokenizer, cfg, generator, args.think == "on", toolbox, args.max_tool_rounds)
    display = Display(sys.stdout, color=sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    interactive = args.prompt is None and sys.stdin.isatty()
    if interactive:
        enable_line_editing()
        extras = (["/think on|off"] if tokenizer.supports_thinking and args.mode == "chat" else []) + \
            ([f"tools: {', '.join(toolbox.functions)}"] if toolbox else [])
        print(f"{path} ({model.num_parameters() / 1e6:.1f}M parameters, {args.mode} mode). "
              f"Empty line to quit, /reset to forget the conversation" + "".join(f"; {x}" for x in extras) + ".")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = []  # earlier exchanges, each a list of messages
    prompts = iter(args.prompt) if args.prompt is not None else None
    while True:
        if prompts is not None:
            prompt = next(prompts, None)
        else:
            try:
                prompt = input("> " if interactive else "")
            except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: quit
                prompt = None
        if not prompt:
            return
        command = prompt.split()
        if command == ["/reset"]:
            history = []
            continue
        if command[:1] == ["/think"]:
            if command[1:] not in (["on"], ["off"]) or not tokenizer.supports_thinking or args.mode == "text":
                print("/think on|off (a minimind-3 tokenizer's chat template)" if tokenizer.supports_thinking
                      else "/think: " + fmt % "thinking switch")
            else:
                session.thinking = command[1] == "on"
            continue
        if interactive:
            print("< ", end="", flush=True)
        try:
            if args.mode == "text":
                ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
                for piece in stream_text(model, tokenizer, ids, cfg, generator):
                    display.write(piece)
                display.end()
                continue
            user = [{"role": "user", "content": prompt}]
            turn = user + answer(session, system + [m for h in history for m in h] + user, display)
        except KeyboardInterrupt:  # Ctrl-C during a reply: drop it, keep the conversation, ask again
            display.stopped()
            continue
        if args.history > 0:
            history = (history + [turn])[-args.history:]


if __name__ == "__main__":
    main()
