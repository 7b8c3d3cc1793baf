"""The bundled demo: a small invented world (data generator), the held-out quiz that shows learning (answers ranked
by likelihood), the exact match of generated answers (what a user sees), the calculator tool (minimind.demo.tools)
and GRPO's reward for answering about the person asked (minimind.demo.rewards)."""

__all__ = ["evaluate", "exact_match", "write_demo_data"]


def __getattr__(name):  # lazy, so that `python -m minimind.demo.data` or `.quiz` does not import its module twice
    if name == "write_demo_data":
        from minimind.demo.data import write_demo_data
        return write_demo_data
    if name == "evaluate":
        from minimind.demo.quiz import evaluate
        return evaluate
    if name == "exact_match":
        from minimind.demo.answers import exact_match
        return exact_match
    raise AttributeError(name)
