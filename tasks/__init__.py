"""
Tasks: the registry, and the entry points every stage shares (get_task, checkpoint_task, prompt_ids).

    arith      multi-step arithmetic on a running total (the default; tiny models learn it in minutes)
    countdown  reach a target from given numbers; any valid solution is accepted
    deps       evaluate a variable through a small dependency graph (for retry data, data.inject_retry)
    sudoku     complete a small Sudoku (for depth-first search traces, data.inject_search)
    gsm8k      grade-school math word problems (assets/gsm8k, MIT licence; or your own JSONL files)

Each task has a module of its own here; what they share lives below them: the one answer parser in
answers.py, the Task interface and the synthetic tasks' base in base.py. The imports point one way,
answers <- base <- each task <- this file, so no module needs a lazy import.
"""
from tasks.arith import Arith
from tasks.base import SyntheticTask, Task   # re-exported: the rest of the repo imports them from here
from tasks.countdown import Countdown
from tasks.deps import Deps
from tasks.gsm8k import GSM8K
from tasks.sudoku import Sudoku

TASKS = dict(arith=Arith, countdown=Countdown, deps=Deps, sudoku=Sudoku, gsm8k=GSM8K)


def task_class(name):
    """The class of the task called name."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: expected one of {sorted(TASKS)}")
    return TASKS[name]


def get_task(name="arith", **kw):
    return task_class(name)(**kw)


def checkpoint_task(meta, name="", kwargs=None):
    """The task a later stage works on: `name`/`kwargs` when given, else the one the checkpoint
    was trained on (its settings kept only when the task is the same). Returns (name, kwargs, task)."""
    name = name or meta.get("task", "arith")
    if kwargs is None:
        kwargs = meta.get("task_kwargs", {}) if name == meta.get("task") else {}
    return name, kwargs, get_task(name, **kwargs)


def prompt_ids(tok, task, p):
    """The prompt ids of problem p, the one way every stage makes them (traces, rollouts, evaluation,
    self-errors, generation): with the tokenizer's chat template on (tok.chat), the conversation
    task.messages(p) (the user turn task.user_message(p), after any example turns) rendered by
    tok.chat_ids; else tok.encode(task.prompt(p))."""
    if getattr(tok, "chat", False):
        return tok.chat_ids(task.messages(p))
    return tok.encode(task.prompt(p))
