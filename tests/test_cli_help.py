"""Every command line says what each of its flags does: `--help` shows a line of text for every flag."""
import argparse
import importlib
import sys

import pytest

COMMANDS = ["train.pretrain", "train.sft", "train.lora", "train.dpo", "train.distill", "train.reason", "train.demo",
            "train.tokenizer", "train.plot", "minimind.chat", "minimind.serve", "minimind.export", "minimind.import_hf",
            "minimind.evaluate", "minimind.data.__main__", "minimind.demo.data", "minimind.demo.quiz", "bench.data",
            "bench.generate", "bench.serve", "bench.kernels", "bench.throughput", "bench.cost", "bench.report",
            "bench.compile_report", "bench.rl", "train.grpo", "train.ppo", "kernels.aot"]


class _Parsed(Exception):
    """Raised in place of parsing, carrying the parser the command built."""


def parser_of(module, monkeypatch):
    """The ArgumentParser `python -m module` builds: its main() runs until it parses the command line."""
    def capture(self, args=None, namespace=None):
        raise _Parsed(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(sys, "argv", [module])
    with pytest.raises(_Parsed) as e:
        importlib.import_module(module).main()
    return e.value.args[0]


@pytest.mark.parametrize("module", COMMANDS)
def test_every_flag_has_help(module, monkeypatch):
    parser = parser_of(module, monkeypatch)
    flags = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert flags
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in flags if not (a.help or "").strip()]
    assert not missing, f"python -m {module}: no help text for {missing}"
    parser.format_help()  # every %(default)s placeholder formats
