"""MiniMind models (MiniMind2 and minimind-3): config, model, tokenizer, data, generation; chat, serving, export,
import and evaluation of weight files."""

__all__ = ["MiniMindConfig", "MiniMindForCausalLM"]


def __getattr__(name):  # lazy, so that `python -m minimind.model` does not import the module twice
    if name == "MiniMindConfig":
        from minimind.config import MiniMindConfig
        return MiniMindConfig
    if name == "MiniMindForCausalLM":
        from minimind.model import MiniMindForCausalLM
        return MiniMindForCausalLM
    raise AttributeError(name)
