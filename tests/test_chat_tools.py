"""The terminal chat (minimind.chat) with minimind-3's template: the thinking shown apart from the answer, --think,
tool calls from a --tools file run and fed back, the round limit, clear errors for a MiniMind2 tokenizer; and line
editing on a real terminal (a pty). The model is scripted (tests/scripted_model.py), so the output is known and the
prompts it was given are checked against the chat template."""
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import minimind.chat as chat_module
from minimind.generate import chat
from minimind.tools import Toolbox
from tests.scripted_model import minimind3_tokenizer, scripted_model
from tests.test_chat import run_chat, save_fp16, tiny
from tests.train_helpers import ROOT

CALL_ADD = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
TOOLS_FILE = '''
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


def _helper():
    return 0
'''


@pytest.fixture(scope="module")
def tokenizer():
    return minimind3_tokenizer()


@pytest.fixture
def scripted(monkeypatch, tokenizer):
    """chat's model is a scripted one: scripted(*replies) -> the model (its .prompts grow as it is asked)."""
    def make(*replies):
        model = scripted_model(tokenizer, *replies)
        monkeypatch.setattr(chat_module, "open_model", lambda args: (model, tokenizer, Path("scripted.pth")))
        return model
    return make


def prompt_of(tokenizer, messages, **options):
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **options))


ASK = [{"role": "user", "content": "What is 2 + 3?"}]


def test_thinking_is_shown_apart_from_the_answer(scripted, tokenizer):
    model = scripted("Let me add.\n</think>\n\n5.")
    out = run_chat(["x", "--think", "on", "--prompt", ASK[0]["content"]])
    assert out == "<think>\nLet me add.\n</think>\n5.\n"  # piped: tags; on a terminal the reasoning is dimmed
    assert model.prompts == [prompt_of(tokenizer, ASK, enable_thinking=True)]
    model = scripted("5.", "<think>\nhm\n</think>\n\nsix")
    out = run_chat(["x", "--think", "off", "--prompt", ASK[0]["content"], "--prompt", "again"])
    assert out == "5.\n<think>\nhm\n</think>\nsix\n"  # thinking unasked is shown apart too
    assert model.prompts[0] == prompt_of(tokenizer, ASK, enable_thinking=False)


def test_thinking_can_be_switched_mid_chat(scripted, tokenizer):
    model = scripted("a", "b\n</think>\n\nc")
    out = run_chat(["x", "--history", "1"], stdin=f"{ASK[0]['content']}\n/think on\nnext\n")
    assert out == "a\n<think>\nb\n</think>\nc\n"
    earlier = ASK + [{"role": "assistant", "content": "a"}, {"role": "user", "content": "next"}]
    assert model.prompts == [prompt_of(tokenizer, ASK), prompt_of(tokenizer, earlier, enable_thinking=True)]


def test_the_display_on_a_terminal_dims_the_reasoning():
    import io
    out = io.StringIO()
    display = chat_module.Display(out, color=True)
    for event in [("reasoning", "hm"), ("content", "5"), ("tool_call", {"function": {"name": "f", "arguments": "{}"}})]:
        display.show(event)
    display.end()
    assert out.getvalue() == "\033[2mhm\033[0m\n5\n\033[36m[call] f({})\033[0m\n"


def test_tools_from_a_file_are_called_and_their_results_fed_back(scripted, tokenizer, tmp_path):
    tools = tmp_path / "my_tools.py"
    tools.write_text(TOOLS_FILE)
    model = scripted(CALL_ADD, "2 + 3 = 5.", "Yes.")
    out = run_chat(["x", "--tools", str(tools), "--history", "1"], stdin=f"{ASK[0]['content']}\nSure?\n")
    assert out == '[call] add({"a": 2, "b": 3})\n[result] 5\n2 + 3 = 5.\nYes.\n'
    schemas = Toolbox.from_file(tools).schemas
    assert [s["function"]["name"] for s in schemas] == ["add"]  # _helper is private
    assert schemas[0]["function"]["parameters"]["properties"]["a"] == {"type": "integer", "description": "the first"}
    call = {"name": "add", "arguments": {"a": 2, "b": 3}}
    exchange = ASK + [{"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": "5"}]
    later = exchange + [{"role": "assistant", "content": "2 + 3 = 5."}, {"role": "user", "content": "Sure?"}]
    assert model.prompts == [prompt_of(tokenizer, ASK, tools=schemas), prompt_of(tokenizer, exchange, tools=schemas),
                             prompt_of(tokenizer, later, tools=schemas)]  # the history keeps the tool exchange


def test_tool_rounds_are_bounded_and_bad_calls_answered_with_an_error(scripted, tokenizer, tmp_path):
    tools = tmp_path / "my_tools.py"
    tools.write_text(TOOLS_FILE)
    bad = '<tool_call>\n{"name": "add", "arguments": {"a": "two"}}\n</tool_call>'
    model = scripted(bad)  # it calls, whatever it is told
    out = run_chat(["x", "--tools", str(tools), "--max_tool_rounds", "2", "--prompt", "2+3?"])
    assert out.count("[call] add") == 3 and len(model.prompts) == 3
    assert "[result] {\"error\": \"add: arguments lacks 'b'; arguments.a should be integer, got \\\"two\\\"\"}" in out
    assert out.endswith("[stopped: 2 rounds of tool calls, --max_tool_rounds]\n")


def test_minimind2_and_bad_files_are_clear_errors(tmp_path, capsys, scripted):
    path = save_fp16(tiny(), tmp_path / "full_sft_64.pth")  # the bundled tokenizer: MiniMind2's format
    for flags, says in ((["--think", "on"], "--think: the tokenizer speaks MiniMind2's chat format"),
                        (["--tools", str(tmp_path / "t.py")], "--tools: the tokenizer speaks MiniMind2's")):
        with pytest.raises(SystemExit) as e:
            chat_module.main([str(path), "--prompt", "hi", *flags])
        assert e.value.code == 2 and says in capsys.readouterr().err
    scripted("x")
    (tmp_path / "broken.py").write_text("def f(:\n")
    (tmp_path / "empty.py").write_text("X = 1\n")
    for name, says in (("missing.py", "no such file"), ("broken.py", "broken.py: SyntaxError"),
                       ("empty.py", "no public functions")):
        with pytest.raises(SystemExit):
            chat_module.main(["x", "--prompt", "hi", "--tools", str(tmp_path / name)])
        assert says in capsys.readouterr().err, name


def read_until(fd, marker: bytes, timeout=60.0) -> bytes:
    out, deadline = b"", time.monotonic() + timeout
    while marker not in out:
        assert time.monotonic() < deadline, out
        if select.select([fd], [], [], 0.5)[0]:
            try:
                out += os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
    return out


def test_arrow_keys_edit_the_line_and_recall_history_on_a_terminal(tmp_path):
    """On a terminal, Left moves the cursor (the line sent is "hXi", not "hi" + an escape code + "X") and Up
    recalls the last line."""
    model = tiny()
    path = save_fp16(model, tmp_path / "full_sft_64.pth")
    from minimind.tokenizer import load_tokenizer
    tok, flags = load_tokenizer(), dict(max_new_tokens=4, temperature=0.0)
    want = chat(chat_module.load_model(path), tok, [{"role": "user", "content": "hXi"}], **flags)
    raw = chat(chat_module.load_model(path), tok, [{"role": "user", "content": "hi\x1b[DX"}], **flags)
    assert want != raw  # the test can tell the two apart
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "minimind.chat", str(path), "--temperature", "0",
                             "--max_new_tokens", "4", "--device", "cpu"], cwd=ROOT, stdin=child, stdout=child,
                            stderr=child, env={**os.environ, "TERM": "xterm", "NO_COLOR": "1"}, close_fds=True)
    os.close(child)
    try:
        read_until(main, b"> ")
        os.write(main, b"hi\x1b[DX\r")
        first = read_until(main, b"\n> ").decode(errors="replace").replace("\r\n", "\n")
        os.write(main, b"\x1b[A\r")
        second = read_until(main, b"\n> ").decode(errors="replace").replace("\r\n", "\n")
        os.write(main, b"\r")
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(main)
    assert f"< {want}\n" in first and f"< {want}\n" in second, (first, second)
