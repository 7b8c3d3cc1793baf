"""The bundled demo: a small invented world (data generator) and the held-out quiz that shows learning."""

__all__ = ["evaluate", "write_demo_data"]


def __getattr__(name):  # lazy, so that `python -m minimind.demo.data` or `.quiz` does not import its module twice
    if name == "write_demo_data":
        from minimind.demo.data import write_demo_data
        return write_demo_data
    if name == "evaluate":
        from minimind.demo.quiz import evaluate
        return evaluate
    raise AttributeError(name)
