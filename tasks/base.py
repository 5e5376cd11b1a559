"""
The task interface, and the base of the synthetic tasks.

A task says where problems come from, how they are prompted, and how a response's text is checked.
A problem is a dict with at least 'question', 'answer' (canonical, as parse_answer returns it) and
'solution' (the clean response text, without end-of-text, ending in a '#### <answer>' line). The
response follows the prompt directly: tasks.prompt_ids makes it, task.prompt(problem) as plain
text, or task.messages(problem) in the model's chat template. Every verifier reads the RESOLVED text
(BKs applied, docs/backtrack-semantics.md §1), through the one answer parser (tasks/answers.py).

Also here: apply_op, the arithmetic every task's steps are checked with.
"""
import hashlib
import random

from tasks.answers import parse_answer, response_lines
from tokenizer import EOT_TEXT


class Task:
    """The interface every stage uses. The defaults suit a response that ends in one '#### <answer>'
    line; a task overrides what differs (its problems always, its steps and slips where it can)."""
    name = "task"

    def problems(self, split, n=None, seed=0):
        raise NotImplementedError

    def prompt(self, p):
        return p["question"] + "\n"

    def user_message(self, p):
        """What the user says in a chat turn (a chat template wraps it; see prompt_ids)."""
        return p["question"]

    def messages(self, p):
        """The conversation a chat prompt renders: [{"role", "content"}], ending in the user's turn."""
        return [dict(role="user", content=self.user_message(p))]

    def answer_of(self, text):
        """The final answer a response gives (what a majority vote counts): parse_answer's."""
        return parse_answer(text)

    def verify(self, text, p):
        """The answer is right and the response is well formed (one '####' line, the last)."""
        return self.well_formed(text) and parse_answer(text) == p["answer"]

    def scores(self, text, p):
        """Extra named correctness checks of a response (bools), reported beside acc as <name>_acc."""
        return {}

    def well_formed(self, text):
        """The response ends in its one answer line: '####' occurs exactly once (up to end-of-text),
        on the last non-empty line, and the answer there parses. A second '####' (a hedge, or the
        answer written twice) or anything after the answer line is not well formed: parse_answer
        would read the last one, so without this a hedged answer would score like a clean one."""
        text = text.split(EOT_TEXT)[0]
        lines = response_lines(text)
        return text.count("####") == 1 and "####" in lines[-1] and parse_answer(text) is not None

    def steps(self, text, p):
        """Per-step checks (bools) of a response. The reward's "every step right" needs a non-empty
        list (reward.is_right), so a task that can tell how many steps a problem needs should return
        one check per required step (a missing step is a failed check), not only per line written."""
        return []

    def slip(self, p, rng):
        """A plausible wrong solution of p (text), or None: material for lcs augmentation."""
        return None

    def is_test(self, p):
        return False

    def check_train(self, problems):
        """Raise if any problem belongs to the test split: training data must never contain one."""
        bad = [p["question"] for p in problems if self.is_test(p)]
        if bad:
            raise ValueError(f"{self.name}: {len(bad)} test problem(s) in training data, e.g. {bad[0][:80]!r}")


def apply_op(op, a, b):
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op in "*x×":
        return a * b
    if op in "/÷":
        return a / b  # callers pass Fractions; b == 0 raises ZeroDivisionError
    raise ValueError(f"unknown operator {op!r}")


def _bucket(text, n=10):
    # a stable hash (Python's hash() is salted per process): splits must not change between runs
    return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) % n


class SyntheticTask(Task):
    """A task whose problems are drawn by self._make(rng). Splits: a question is 'test' iff a
    stable hash of it falls in the test bucket (1 in 10), so train and test are disjoint whatever
    the seeds; the test set holds distinct questions, while training may repeat one."""

    def problems(self, split, n=None, seed=0):
        assert split in ("train", "test"), f"unknown split {split!r}"
        n = self.n_default[split] if n is None else n
        rng = random.Random(f"{self.name}:{split}:{seed}")
        out, seen = [], set()
        for _ in range(100 * n + 1000):
            if len(out) == n:
                break
            p = self._make(rng)
            if self.is_test(p) != (split == "test") or (split == "test" and p["question"] in seen):
                continue
            seen.add(p["question"])
            out.append(p)
        return out

    def is_test(self, p):
        return _bucket(p["question"]) == 0
