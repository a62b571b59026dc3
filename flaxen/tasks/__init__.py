"""flaxen's tasks: one definition per task, registered by name (see flaxen/tasks/base.py).

    task = flaxen.tasks.get(cfg.task.name)      # a Task; the steps, loop, evaluation and data call it
"""
from flaxen.tasks.base import IGNORE_INDEX, Task, for_run, get, names, register
from flaxen.tasks import clm, mlm, qa, seq2seq, seq_cls, span_corruption, token_cls  # noqa: F401  (registers them)

__all__ = ["IGNORE_INDEX", "Task", "for_run", "get", "names", "register"]
