"""The tool-call eval (minimind.toolcall_eval, python -m minimind.evaluate --toolcall): the scorer on scripted
replies (valid and invalid calls, the wrong tool, a tool not offered, a broken block, a task that never stops
calling, answers found as numbers or words), the harness end to end on a scripted model (the prompts are the
template's, the tool results the mock tools'), batched replies equal to those alone, the bundled files, and the command line on a tiny random model
with the real minimind-3 tokenizer (its scores are low; they must only be well-formed)."""
import io
import json
from contextlib import redirect_stdout
from dataclasses import replace

import pytest
import torch

from minimind.evaluate import main
from minimind.generate import Engine, SamplingConfig, row_seeds
from minimind.tools import Toolbox
from minimind.toolcall_eval import (DEFAULT_TASKS, DEFAULT_TOOLS, Task, contains, load_tasks, model_completer,
                                    run_tasks, summarize)
from tests.reference_files import reference_folder
from tests.scripted_model import minimind3_tokenizer, scripted_model
from tests.test_chat import save_fp16, tiny


def call(name, **arguments):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)}\n</tool_call>'


@pytest.fixture(scope="module")
def toolbox():
    return Toolbox.from_file(DEFAULT_TOOLS)


@pytest.fixture(scope="module")
def tasks(toolbox):
    return {t.id: t for t in load_tasks(DEFAULT_TASKS, toolbox)}


def scripted(replies_by_prompt):
    """complete() answering each task's round k with replies_by_prompt[its prompt][k]; it checks the tools offered."""
    def complete(conversations):
        out = []
        for messages, tools in conversations:
            assert tools and all(t["type"] == "function" for t in tools)
            rounds = sum(m["role"] == "assistant" for m in messages)
            out.append(replies_by_prompt[messages[0]["content"]][rounds])
        return out
    return complete


def test_answers_are_found_as_numbers_or_words():
    assert contains("256 × 37 = 9472。", 9472) and contains("是 9,472 哦", "9472") and contains("9472.0", 9472)
    assert not contains("94720", 9472) and not contains("1.9472", 9472) and not contains("9472.5", 9472)
    assert contains("约 62.14 英里", 62.14) and contains("28度，晴", 28) and contains("-3.5°C", -3.5)
    assert contains("Light RAIN today", "rain") and not contains("sunny", "rain")


def test_the_scorer_on_scripted_replies(tasks, toolbox):
    picked = [tasks[i] for i in ("multiply", "km-to-miles", "weather", "two-cities", "no-tool-greeting",
                                 "exchange-rate", "add", "square-root")]
    replies = {
        # right tool, right answer
        tasks["multiply"].prompt: [call("calculate", expression="256*37"), "256 乘以 37 等于 9472。"],
        # a tool the task does not offer (answered with an error), then a wrong answer
        tasks["km-to-miles"].prompt: [call("get_weather", city="北京"), "大约 60 英里。"],
        # the wrong arguments, then the right call, right answer: the tools are not right (an invalid call)
        tasks["weather"].prompt: [call("get_weather", location="北京"), call("get_weather", city="北京"),
                                  "北京今天晴，28 度。"],
        # two calls in one reply
        tasks["two-cities"].prompt: [call("get_weather", city="上海") + "\n" + call("get_weather", city="广州"),
                                     "上海 15 度，广州 32 度。"],
        # no tool needed, none called
        tasks["no-tool-greeting"].prompt: ["你好！我是 MiniMind。"],
        # a broken block: not a call, so the reply is final (and wrong)
        tasks["exchange-rate"].prompt: ['<tool_call>\n{"name": "get_exchange_rate", "arguments": {USD}}\n'
                                        '</tool_call>'],
        # never stops calling: unfinished after 3 rounds, though the number is there
        tasks["add"].prompt: [call("calculate", expression="1234+5678") + " 6912"] * 4,
        # answers without the tool: right answer, wrong tools
        tasks["square-root"].prompt: ["144 的平方根是 12。"],
    }
    results = {r["id"]: r for r in run_tasks(picked, toolbox, scripted(replies), max_tool_rounds=3)}
    flags = {i: (r["right_tools"], r["right_answer"], r["finished"]) for i, r in results.items()}
    assert flags == {"multiply": (True, True, True), "km-to-miles": (False, False, True),
                     "weather": (False, True, True), "two-cities": (True, True, True),
                     "no-tool-greeting": (True, True, True), "exchange-rate": (False, False, True),
                     "add": (False, False, False), "square-root": (False, True, True)}  # add: 4 calls, not 1
    # the tools' results went back to the model as tool messages
    assert results["multiply"]["messages"][2] == {"role": "tool", "tool_call_id": results["multiply"]["messages"][1][
        "tool_calls"][0]["id"], "content": '{"result": 9472}'}
    assert "no tool named 'get_weather'" in results["km-to-miles"]["messages"][2]["content"]
    assert results["weather"]["calls"][0]["problem"] == "get_weather: arguments lacks 'city'"
    assert [m["content"] for m in results["two-cities"]["messages"] if m["role"] == "tool"] == [
        '{"city": "上海", "temperature_celsius": 15, "condition": "多云"}',
        '{"city": "广州", "temperature_celsius": 32, "condition": "闷热"}']
    assert len(results["exchange-rate"]["invalid_blocks"]) == 1 and len(results["add"]["replies"]) == 4
    totals = summarize(list(results.values()))
    # calls written: multiply 1, km 1 (invalid), weather 2 (1 invalid), two-cities 2, exchange 1 block, add 4
    assert totals["calls_written"] == 11 and totals["valid_calls"] == pytest.approx(8 / 11)
    assert (totals["right_tools"], totals["right_answer"], totals["solved"]) == (3 / 8, 5 / 8, 3 / 8)


def test_the_harness_end_to_end_on_a_scripted_model(tasks, toolbox):
    """Generation, the template and the scorer together: a model that says the right things solves every task,
    and the prompts of the second round are the template's rendering of the tool exchange."""
    tok = minimind3_tokenizer()
    picked = [tasks["multiply"], tasks["two-cities"], tasks["no-tool-greeting"]]
    model = scripted_model(tok, call("calculate", expression="256 * 37"),  # round 1, in task order
                           call("get_weather", city="上海") + "\n" + call("get_weather", city="广州"),
                           "你好！我是 MiniMind。",
                           "等于 9472。", "上海 15 度，广州 32 度。")  # round 2
    complete = model_completer(model, tok, SamplingConfig(max_new_tokens=80, temperature=0.0), batch_size=1)
    results = run_tasks(picked, toolbox, complete)
    assert [r["solved"] for r in results] == [True, True, True]
    assert summarize(results)["valid_calls"] == 1.0
    schemas = toolbox.subset(tasks["multiply"].tools).schemas
    exchange = [{"role": "user", "content": tasks["multiply"].prompt},
                {"role": "assistant", "content": "", "tool_calls": [{"name": "calculate",
                                                                     "arguments": {"expression": "256 * 37"}}]},
                {"role": "tool", "content": '{"result": 9472}'}]
    assert model.prompts[3] == tok.encode(tok.apply_chat_template(exchange, tools=schemas, add_generation_prompt=True))


def test_the_replies_of_a_batch_are_those_each_gets_alone(tasks):
    """model_completer generates a round's conversations together (3 rows at a time here, of prompts of different
    lengths): each reply, sampled with a seed, is the one the conversation gets alone, cut at <|im_end|>."""
    tok, model = minimind3_tokenizer(), tiny()
    conversations = [([{"role": "user", "content": t.prompt}], None) for t in list(tasks.values())[:5]]
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=1.0)
    together = model_completer(model, tok, cfg, seed=3, batch_size=3)(conversations)
    seeds = row_seeds(len(conversations), torch.Generator().manual_seed(3))
    for (messages, _), text, seed in zip(conversations, together, seeds):
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
        engine = Engine(model, 1, len(ids) + 12)
        engine.add(ids, replace(cfg, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id), seed)
        alone = [e.token for _ in range(12) if engine.busy for e in engine.step()]
        alone = alone[:alone.index(tok.eos_id)] if tok.eos_id in alone else alone
        assert text == tok.decode(alone, skip_special_tokens=True)
    assert len(set(together)) > 1  # a random model at temperature 1 says different things


def test_the_bundled_files_and_bad_task_files(toolbox, tasks, tmp_path):
    assert len(tasks) == 14 and set(toolbox.functions) == {"calculate", "convert_units", "get_weather",
                                                           "get_exchange_rate"}
    for t in tasks.values():  # every needed call, made right, gives the expected answer
        results = [json.loads(toolbox.run({"name": n, "arguments": a})) for n, a in EXPECTED_CALLS[t.id]]
        assert [n for n, _ in EXPECTED_CALLS[t.id]] == t.calls
        if t.calls:
            assert all(contains(json.dumps(results, ensure_ascii=False), v) for v in t.answer), t.id
    bad = tmp_path / "bad.jsonl"
    for line, says in (('{"id": 1, "prompt": "x"}', "bad.jsonl:1: not a task"),
                       ('{"id": 1, "prompt": "x", "tools": ["nope"]}', "bad.jsonl:1: tools ['nope'] are not"),
                       ('{"id": 1, "prompt": "x", "tools": ["calculate"], "calls": ["get_weather"]}',
                        "does not offer"),
                       ("", "no tasks")):
        bad.write_text(line + "\n")
        with pytest.raises(ValueError) as e:
            load_tasks(bad, toolbox)
        assert says in str(e.value)


EXPECTED_CALLS = {
    "multiply": [("calculate", {"expression": "256 * 37"})], "add": [("calculate", {"expression": "1234 + 5678"})],
    "parentheses": [("calculate", {"expression": "(15 + 27) * 3"})],
    "square-root": [("calculate", {"expression": "sqrt(144)"})],
    "km-to-miles": [("convert_units", {"value": 100, "from_unit": "公里", "to_unit": "英里"})],
    "celsius-to-fahrenheit": [("convert_units", {"value": 30, "from_unit": "celsius", "to_unit": "fahrenheit"})],
    "kg-to-pounds": [("convert_units", {"value": 5, "from_unit": "kg", "to_unit": "pounds"})],
    "weather": [("get_weather", {"city": "北京"})], "weather-en": [("get_weather", {"city": "London"})],
    "exchange-rate": [("get_exchange_rate", {"from_currency": "USD", "to_currency": "CNY"})],
    "two-cities": [("get_weather", {"city": "上海"}), ("get_weather", {"city": "广州"})],
    "weather-then-convert": [("get_weather", {"city": "Tokyo"}),
                             ("convert_units", {"value": 12, "from_unit": "C", "to_unit": "F"})],
    "no-tool-greeting": [], "no-tool-story": []}


def test_the_command_line_on_a_tiny_model(tmp_path, capsys):
    path = save_fp16(tiny(), tmp_path / "full_sft_64.pth")
    folder = str(reference_folder("minimind3-tokenizer"))
    out = io.StringIO()
    with redirect_stdout(out):
        main([str(path), "--toolcall", "--tokenizer", folder, "--max_new_tokens", "6", "--device", "cpu",
              "--out", str(tmp_path / "scores.json")])
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["n"] == 14 and len(scores["tasks"]) == 14 and "overall" in out.getvalue()
    for key in ("right_tools", "right_answer", "solved"):
        assert 0 <= scores[key] <= 1
    assert scores["right_tools"] >= 2 / 14  # the two tasks that need no tool: a random model calls none
    for flags, says in ((["--toolcall"], "MiniMind2's"), ([], "give --data"), (["--toolcall", "--data", "x"], "give")):
        with pytest.raises(SystemExit):
            main([str(path), *flags])
        assert says in capsys.readouterr().err
