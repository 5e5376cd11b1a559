"""
Tasks: where problems come from, how they are prompted, and exact verifiers of a response's text.

A problem is a dict with at least 'question', 'answer' (canonical, as parse_answer returns it) and
'solution' (the clean response text, without end-of-text, ending in a '#### <answer>' line). The
response follows the prompt directly: prompt_ids (below) makes it, task.prompt(problem) as plain
text, or task.messages(problem) in the model's chat template. Every verifier reads the RESOLVED text
(BKs applied, docs/backtrack-semantics.md §1), through the one answer parser below.

    arith      multi-step arithmetic on a running total (the default; tiny models learn it in minutes)
    countdown  reach a target from given numbers; any valid solution is accepted
    deps       evaluate a variable through a small dependency graph (for retry data, data.inject_retry)
    gsm8k      grade-school math word problems (gsm8k.py; assets/gsm8k, MIT licence; or your own JSONL files)
"""
import gzip
import hashlib
import json
import random
import re
from fractions import Fraction

from tokenizer import EOT_TEXT


# -----------------------------------------------------------------------------
# answers: the one parser that rewards and evaluation share

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")


def normalize_number(s):
    """Canonical text of a number: '1,000' -> '1000', '$3.50' -> '3.5', '-0' -> '0', '+7.' -> '7'.
    None if s is not a plain number (no units, no words: the verifiers are exact)."""
    s = s.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if not _NUMBER.fullmatch(s):
        return None
    sign = "-" if s[0] == "-" else ""
    whole, _, frac = s.lstrip("+-").partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    if whole == "0" and not frac:
        sign = ""  # -0 is 0
    return sign + whole + ("." + frac if frac else "")


def parse_answer(text):
    """The final answer of a response: the number on the line after the last '####' (text after an
    end-of-text marker is ignored), normalized by normalize_number; None when absent or not a number."""
    if text is None:
        return None
    text = text.split(EOT_TEXT)[0]
    if "####" not in text:
        return None
    return normalize_number(text.rsplit("####", 1)[1].split("\n")[0])


def response_lines(text):
    """Non-empty, stripped lines of a response, up to end-of-text."""
    return [l.strip() for l in text.split(EOT_TEXT)[0].split("\n") if l.strip()]


def _bucket(text, n=10):
    # a stable hash (Python's hash() is salted per process): splits must not change between runs
    return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) % n

# -----------------------------------------------------------------------------
# tasks: generators or loaders, prompt formats and exact verifiers
#
# A problem is a dict with at least 'question', 'answer' (canonical, as parse_answer returns it) and
# 'solution' (the clean response text, without end-of-text, ending in a '#### <answer>' line).
# The response follows the prompt directly (prompt_ids).


class Task:
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


class Arith(SyntheticTask):
    """Multi-step arithmetic on a running total, for tiny models trained from scratch.

    question '3+5-2+7', response '3+5=8\\n8-2=6\\n6+7=13\\n#### 13'. Every step reads the previous
    result and the next operand and is computable on its own; totals stay in [0, max_value], so
    the numbers in a step are short (about 45 byte tokens per example).

    Measured with a 1.8M-parameter GPT (4 layers, 192 wide, byte tokens), batch 32, AdamW 1e-3
    cosine over 2000 steps, clean traces, greedy accuracy on 200 test problems:
      defaults (1-digit operands, 2-4 steps):  11% @250 steps, 48% @500, 94% @1000, 100% @2000
      digits=2 (2-digit operands):              1% @500,  43% @1000, 69% @1500,  80% @2000
      defaults, half the traces with plausible errors (<= 4 BKs, masked):
                                               25% @500,  78% @1000, 90% @1500,  98% @2000
    A step is ~0.12 s on 2 idle CPU cores, so the defaults are learned in ~2 minutes; digits=2
    (or more steps) leaves room for errors that backtracking can fix.
    Splits: a question is 'test' iff a stable hash of it falls in the test bucket (1 in 10), so
    train and test are disjoint whatever the seeds.
    """
    name = "arith"

    def __init__(self, min_steps=2, max_steps=4, digits=1, ops="+-", max_value=99, n_train=20000, n_test=500,
                 steps=None):
        if steps is not None:  # shorthand: exactly this many steps
            min_steps = max_steps = int(steps)
        assert 1 <= min_steps <= max_steps and digits >= 1 and set(ops) <= set("+-*"), "bad arith settings"
        self.min_steps, self.max_steps, self.digits, self.ops = min_steps, max_steps, digits, ops
        self.max_value, self.n_default = max_value, dict(train=n_train, test=n_test)
        self.lo, self.hi = (1 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
        assert self.hi <= max_value, "max_value must hold an operand"

    def _make(self, rng):
        total = rng.randint(self.lo, self.hi)
        nums, ops = [total], []
        for _ in range(rng.randint(self.min_steps, self.max_steps)):
            for _ in range(100):  # redraw until the running total stays in range
                op, b = rng.choice(self.ops), rng.randint(self.lo, self.hi)
                if 0 <= apply_op(op, total, b) <= self.max_value:
                    break
            else:
                op, b = "-", min(total, self.hi)
            total = apply_op(op, total, b)
            nums.append(b); ops.append(op)
        return self.problem(nums, ops)

    def problem(self, nums, ops):
        q = str(nums[0]) + "".join(op + str(b) for op, b in zip(ops, nums[1:]))
        lines, total = [], nums[0]
        for op, b in zip(ops, nums[1:]):
            c = apply_op(op, total, b)
            lines.append(f"{total}{op}{b}={c}")
            total = c
        lines.append(f"#### {total}")
        return dict(question=q, answer=str(total), solution="\n".join(lines), nums=nums, ops=ops)

    _STEP = re.compile(r"(-?\d+)([-+*])(\d+)=(-?\d+)")

    def steps(self, text, p):
        """One check per step the problem needs, then one failed check per line too many.

        Step k passes when line k applies the problem's k-th operation to the previous line's result
        (the first number for line 1) and its arithmetic is right; a step not written fails its
        check, so a completion that skips steps can never pass them all (nor earn the clean bonus,
        reward.is_right). The last line, when it holds '####', is the answer (judged by verify);
        every other line is read as a step, so a line that is not a step, a step too many, the
        solution written twice, or an answer line that is not the last, fails a check of its own.
        The list is never empty (a problem has at least one step)."""
        lines = response_lines(text)
        if lines and "####" in lines[-1]:
            lines = lines[:-1]
        n = len(p["ops"])
        out, prev = [], p["nums"][0]
        for k in range(max(n, len(lines))):
            m = self._STEP.fullmatch(lines[k]) if k < len(lines) else None
            if not m or k >= n:
                out.append(False); prev = None
                continue
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            out.append(a == prev and op == p["ops"][k] and b == p["nums"][k + 1] and apply_op(op, a, b) == c)
            prev = c
        return out

    def slip(self, p, rng):
        """One step's result off by a little, and the steps after it carried on from the wrong total."""
        nums, ops = p["nums"], p["ops"]
        k = rng.randrange(len(ops))
        lines, total = [], nums[0]
        for i, (op, b) in enumerate(zip(ops, nums[1:])):
            c = apply_op(op, total, b)
            if i == k:
                c = c + rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if c + d >= 0])
            lines.append(f"{total}{op}{b}={c}")
            total = c
        lines.append(f"#### {total}")
        return "\n".join(lines)


_VALUE = r"(\(\s*-?\d+\s*/\s*\d+\s*\)|-?\d+(?:\.\d+)?)"
_CD_STEP = re.compile(rf"{_VALUE}\s*([-+*/x×÷])\s*{_VALUE}\s*=\s*{_VALUE}")


def _value(s):
    s = s.strip().strip("()").replace(" ", "")
    return Fraction(s)  # '7/2', '-3', '2.5' are all exact


class Countdown(SyntheticTask):
    """Reach a target from n_numbers numbers with + - * /, each number used at most once.

    question 'make 29 from 3 7 8', response '3*8=24\\n24+7=31\\n...#### 29'. Arithmetic is exact
    (Fractions); a non-integer intermediate is written '(7/2)'. verify accepts any valid solution:
    every step uses two values still available (given numbers, or results of earlier steps, each
    once) and computes them right, and the last step's result is the target.
    """
    name = "countdown"

    def __init__(self, n_numbers=3, max_number=20, max_target=100, ops="+-*/", n_train=20000, n_test=500):
        assert n_numbers >= 2 and set(ops) <= set("+-*/"), "bad countdown settings"
        self.n_numbers, self.max_number, self.max_target, self.ops = n_numbers, max_number, max_target, ops
        self.n_default = dict(train=n_train, test=n_test)

    def _make(self, rng):
        while True:
            nums = [rng.randint(1, self.max_number) for _ in range(self.n_numbers)]
            pool, lines = list(nums), []
            ok = True
            while len(pool) > 1:  # combine two random values until one is left: all numbers used
                a = pool.pop(rng.randrange(len(pool)))
                b = pool.pop(rng.randrange(len(pool)))
                op = rng.choice(self.ops)
                if op == "-" and a < b:
                    a, b = b, a  # generated solutions stay positive and in integers
                if op == "/" and (b <= 1 or a % b):
                    op = "+"
                c = int(apply_op(op, Fraction(a), Fraction(b)))
                lines.append(f"{a}{op}{b}={c}")
                pool.append(c)
                ok = ok and c > 0
            t = pool[0]
            if ok and 1 <= t <= self.max_target and t not in nums:
                q = f"make {t} from " + " ".join(map(str, nums))
                return dict(question=q, answer=str(t), solution="\n".join(lines + [f"#### {t}"]), nums=nums, target=t)

    def _walk(self, text, p):
        """(per-step validity, value of the last step, well_formed). A response is well formed when
        it is step lines, then one '####' line, then nothing."""
        lines = response_lines(text)
        ends = [i for i, l in enumerate(lines) if l.startswith("####")]
        well_formed = len(ends) == 1 and ends[0] == len(lines) - 1
        pool = [Fraction(x) for x in p["nums"]]
        ok, last = [], None
        for line in lines[:ends[-1] if ends else len(lines)]:
            m = _CD_STEP.fullmatch(line)
            if not m:
                ok.append(False)
                well_formed = False
                continue
            a, op, b, c = _value(m[1]), m[2], _value(m[3]), _value(m[4])
            good = False
            if a in pool:
                pool.remove(a)
                if b in pool:
                    pool.remove(b)
                    try:
                        good = apply_op(op, a, b) == c
                    except ZeroDivisionError:
                        pass
                    if not good:
                        pool.append(b)
                if not good:
                    pool.append(a)
            if good:
                pool.append(c)
                last = c
            ok.append(good)
        return ok, last, well_formed

    def verify(self, text, p):
        if parse_answer(text) != p["answer"]:
            return False
        ok, last, well_formed = self._walk(text, p)
        return well_formed and bool(ok) and all(ok) and last == Fraction(p["target"])

    def steps(self, text, p):
        return self._walk(text, p)[0]

    def slip(self, p, rng):
        """The reference solution with one step's result off by one (later steps left as they were)."""
        lines = p["solution"].split("\n")[:-1]
        k = rng.randrange(len(lines))
        m = _CD_STEP.fullmatch(lines[k])
        lines[k] = f"{m[1]}{m[2]}{m[3]}={int(_value(m[4])) + rng.choice((-1, 1))}"
        return "\n".join(lines + [f"#### {p['answer']}"])


class Deps(SyntheticTask):
    """Evaluate a variable through a small dependency graph (after Physics of Language Models part
    2.2, arXiv 2408.16293, whose "retry" data this task exists for: data.inject_retry).

    question 'n=s+4;v=n+s;s=6;d=v-1;?v': variables (one lowercase letter each) in shuffled order,
    each a constant (a digit) or an expression 'a<op>b' of one or two other variables (the other
    operand a digit); every value is taken mod 10, so it is one digit. The response computes what
    the query needs, inputs first, one line per variable, then the answer:

        s=6
        n=s+4=6+4=0
        v=n+s=0+6=6
        #### 6

    Each line is local and checks itself: the variable, its definition copied from the prompt, the
    definition with the inputs' values substituted (each copied from the end of an earlier line,
    always 4 tokens after the variable it replaces), and the result mod 10; a constant's line is
    its definition. The clean order is the post-order of a depth-first walk from the query (the
    operands of a definition left to right), so it never computes a distractor.

    verify accepts ANY valid solution: every line is a variable of the problem written as above,
    each input of a line was computed on an earlier line, no variable is written twice, the query
    is computed and the answer line (one '####' line, the last) holds its value; lines for
    distractors, and any topological order, are fine. steps: one check per line written, plus one
    failed check per needed variable without a valid line (so skipping a step never passes them all).

    Knobs: min_vars..max_vars variables that the query needs (itself included; drawn uniformly),
    plus `distractors` that it does not need (constants or expressions of any variables defined
    before them); ops from `ops` ('+-*'). The size of a byte-tokenized example is about
    6 * (vars + distractors) prompt tokens and 12 per needed variable in the response (defaults:
    at most 60 tokens in all; min_vars=5,max_vars=6 still fits block_size 128 and 96 new tokens).

    Measured with the default 1.8M-parameter GPT (4 layers, 192 wide, byte tokens, block_size 128),
    batch 32, lr 2e-3 cosine, clean traces (--backtrack_ratio=0), greedy accuracy on 200 test
    problems (train_sft's held-out eval; each run is its own cosine schedule):
      defaults (1..3 vars, 1 distractor), 3000 steps:  30% @1000, 40% @2000, 48% @3000
          by size at 3000 (evaluated separately): 1 var 87%, 2 vars 58%, 3 vars 2%
          longer split min_vars=4,max_vars=5:        0%
      2..3 vars, 3000 steps:                            4% @1000, 36% @2000, 38% @3000
      2..4 vars, 3000 steps:                            6% @1000, 28% @2000, 29% @3000
      2..4 vars, 1500 steps:                            0% @500,   2% @1000,  6% @1500
    The model learns the format, the first line and the mod-10 arithmetic first (above 90%);
    what it learns last is looking a definition or a constant up in the prompt by its variable,
    and a third variable (a second lookup chain) is mostly beyond it at 3000 steps: room for the
    retry data to help. 3000 steps of the defaults took 16 minutes on 2 CPU cores shared with
    other jobs (0.33 s a step, evaluations included).

    Splits: a question is 'test' iff a stable hash of it falls in the test bucket (1 in 10), as in
    every SyntheticTask. A "longer than training" split is this task with larger min_vars/max_vars
    (e.g. min_vars=4,max_vars=5 after training on the defaults): its questions define more
    variables, so they differ from every training question and can never have been trained on
    (mind the model's block_size and max_new_tokens: both must hold the longer prompt and response,
    and positions past the training lengths are untrained under learned position embeddings).
    """
    name = "deps"
    LETTERS = "abcdefghijklmnopqrstuvwxyz"

    def __init__(self, min_vars=1, max_vars=3, distractors=1, ops="+-", n_train=20000, n_test=500, vars=None):
        if vars is not None:  # shorthand: exactly this many needed variables
            min_vars = max_vars = int(vars)
        assert 1 <= min_vars <= max_vars and distractors >= 0 and max_vars + distractors <= len(self.LETTERS), \
            "bad deps settings"
        assert ops and set(ops) <= set("+-*"), "deps ops are from '+-*'"
        self.min_vars, self.max_vars, self.distractors, self.ops = min_vars, max_vars, distractors, ops
        self.n_default = dict(train=n_train, test=n_test)

    # -- generation

    def _expr(self, rng, vs):
        """A definition over the variables vs (one or two of them; with one, the other operand is
        a digit), operands in random order."""
        ops = list(vs) if len(vs) == 2 else [vs[0], str(rng.randint(0, 9))]
        rng.shuffle(ops)
        return ops[0] + rng.choice(self.ops) + ops[1]

    def _make(self, rng):
        k = rng.randint(self.min_vars, self.max_vars)
        names = rng.sample(self.LETTERS, k + self.distractors)
        need, extra = names[:k], names[k:]   # need: a topological order, the query last
        defs, pending, used = {}, [], []     # pending: defined, not yet an input of anything
        for i, v in enumerate(need):
            if i == 0:
                defs[v] = str(rng.randint(0, 9))
            else:
                # every earlier variable must end up an input of a later one: with k - i variables
                # left (this one included), at most k - i + 1 pending ones can still be consumed
                P = len(pending)
                if i == k - 1:
                    c = P
                else:
                    lo, hi = max(0, P + 1 - (k - i)), min(2, P)
                    c = rng.choices(range(lo, hi + 1), weights=[(0.25, 1.0, 0.5)[x] for x in range(lo, hi + 1)])[0]
                if c == 0:
                    defs[v] = str(rng.randint(0, 9))
                else:
                    take = rng.sample(pending, c)
                    for x in take:
                        pending.remove(x)
                        used.append(x)
                    if c == 1 and used[:-1] and rng.random() < 0.3:   # share an input: a DAG, not a tree
                        take.append(rng.choice([x for x in used if x not in take]))
                    defs[v] = self._expr(rng, take)
            if i < k - 1:
                pending.append(v)
        for j, v in enumerate(extra):   # distractors: nothing the query needs reads them
            pool = need + extra[:j]
            r = rng.random()
            defs[v] = str(rng.randint(0, 9)) if r < 0.3 else self._expr(rng, rng.sample(pool, 1 if r < 0.65 else 2)
                                                                     if len(pool) > 1 else pool[:1])
        shown = list(defs)
        rng.shuffle(shown)
        question = ";".join(f"{v}={defs[v]}" for v in shown) + f";?{need[-1]}"
        return self.problem(question)

    @staticmethod
    def parse(question):
        """(defs in prompt order, query) of a question 'n=s+4;v=n+s;s=6;?v'."""
        *parts, q = question.split(";")
        assert q.startswith("?"), f"not a deps question: {question!r}"
        return dict(p.split("=", 1) for p in parts), q[1:]

    @staticmethod
    def inputs(d):
        """The variables a definition reads, left to right."""
        return [c for c in d if c.isalpha()]

    def problem(self, question):
        """The problem dict of a question: defs, values, needed, clean order, solution."""
        defs, query = self.parse(question)
        values = {}

        def value(v, seen=()):
            if v not in values:
                assert v in defs and v not in seen, f"undefined or cyclic variable {v!r} in {question!r}"
                d = defs[v]
                if len(d) == 1:
                    values[v] = int(d)
                else:
                    a, b = (value(x, seen + (v,)) if x.isalpha() else int(x) for x in (d[0], d[2]))
                    values[v] = apply_op(d[1], a, b) % 10
            return values[v]

        for v in defs:
            value(v)
        order = []

        def walk(v):   # depth-first, operands left to right; post-order = inputs first
            if v not in order:
                for x in self.inputs(defs[v]):
                    walk(x)
                order.append(v)

        walk(query)
        lines = [self.line(v, defs, values) for v in order] + [f"#### {values[query]}"]
        return dict(question=question, answer=str(values[query]), solution="\n".join(lines), defs=defs,
                    values=values, query=query, order=order, needed=sorted(order))

    @staticmethod
    def line(v, defs, values):
        """The line that computes v: 's=6' for a constant, 'n=s+4=6+4=0' for an expression."""
        d = defs[v]
        if len(d) == 1:
            return f"{v}={values[v]}"   # = its definition, unless values are a slip's
        sub = "".join(str(values[c]) if c.isalpha() else c for c in d)
        return f"{v}={d}={sub}={values[v]}"

    # -- verification

    def _walk(self, text, p):
        """(one check per line before the answer line, the variables validly computed)."""
        lines = response_lines(text)
        if lines and "####" in lines[-1]:
            lines = lines[:-1]
        defs, values = p["defs"], p["values"]
        checks, written, done = [], set(), set()
        for l in lines:
            v = l.partition("=")[0]
            ok = (v in defs and v not in written and l == self.line(v, defs, values)
                  and all(x in done for x in self.inputs(defs[v])))
            written.add(v)
            if ok:
                done.add(v)
            checks.append(ok)
        return checks, done

    def verify(self, text, p):
        """Well formed, the answer right, every line valid (inputs computed on earlier lines, no
        variable twice, arithmetic right) and the query computed."""
        if not self.well_formed(text) or parse_answer(text) != p["answer"]:
            return False
        checks, done = self._walk(text, p)
        return all(checks) and p["query"] in done

    def steps(self, text, p):
        """One check per line written (the answer line, when last, excepted), then one failed check
        per needed variable that no valid line computes. Never empty (the query is needed)."""
        checks, done = self._walk(text, p)
        return checks + [False for v in p["needed"] if v not in done]

    def slip(self, p, rng):
        """One line's result off (by one, mostly), and the lines after it carried on from it."""
        defs, order = p["defs"], p["order"]
        k = rng.randrange(len(order))
        vals = dict(p["values"])
        for i, v in enumerate(order):
            d = defs[v]
            if len(d) > 1:
                a, b = (vals[x] if x.isalpha() else int(x) for x in (d[0], d[2]))
                vals[v] = apply_op(d[1], a, b) % 10
            if i == k:
                vals[v] = (vals[v] + (rng.choice((-1, 1)) if rng.random() < 0.7 else rng.randint(2, 8))) % 10
        lines = [self.line(v, defs, vals) for v in order] + [f"#### {vals[p['query']]}"]
        return "\n".join(lines)

    # -- material for data.inject_retry

    def retry_options(self, p, line_index, kind="retry"):
        """Wrong line beginnings to write (and undo) before line `line_index` of the clean solution
        (the answer line is index len(order)): a list, one entry per candidate variable, each a list
        of alternative beginnings ('v=' or 'v=n+s=', where a model would notice that an input is
        missing). kind 'retry': variables of the problem (distractors too) not yet computed there
        with an input not yet computed; 'retry_weak': variables of later lines, ready or not."""
        defs, order = p["defs"], p["order"]
        done = set(order[:line_index])
        if kind == "retry":
            cands = [v for v in defs if v not in done and not all(x in done for x in self.inputs(defs[v]))]
        elif kind == "retry_weak":
            cands = order[line_index + 1:]
        else:
            raise ValueError(f"unknown retry kind {kind!r}: expected 'retry' or 'retry_weak'")
        return [[f"{v}="] + ([f"{v}={defs[v]}="] if len(defs[v]) > 1 else []) for v in cands]

    def search_path(self, p, line_index):
        """The failed attempts that a depth-first search from the query writes before line
        `line_index` of the clean solution: a list of 'v=def' texts, in order (empty before a line
        the search reaches directly, and before the answer line).

        The search keeps a stack of variables, the query at the bottom, and always writes the top
        one's line: when an input of it is not computed yet, the attempt 'v=a+b' shows which one,
        is undone, and that input goes on the stack (its first missing one, left to right); when
        all its inputs are computed, the line is written in full and the variable leaves the stack.
        Its lines are exactly the clean order (the same post-order walk). Each decision reads one
        definition, the last attempt's or the prompt's; none needs a path through the graph planned
        ahead. Under `keep` the undone attempts stay in the context, so the stack can be read back."""
        defs, order = p["defs"], p["order"]
        stack, done, k, attempts = [p["query"]], set(), 0, []
        while stack and k <= line_index:
            v = stack[-1]
            missing = [x for x in self.inputs(defs[v]) if x not in done]
            if missing:
                if k == line_index:
                    attempts.append(f"{v}={defs[v]}")
                stack.append(missing[0])
            else:
                assert order[k] == v, "search order differs from the clean order"
                done.add(v)
                stack.pop()
                k += 1
        return attempts


class Sudoku(SyntheticTask):
    """Complete a small Sudoku (size x size, boxes of box_rows x box_cols), for backtracking as a
    learned search: a dead end (a cell with no value left that its row, column and box allow) is a
    lookup in the context, while choosing the right value at a cell with several allowed ones needs
    lookahead. That is the setting where a depth-first search pays off (Qin et al. 2025, "To
    Backtrack or Not to Backtrack").

    question 'sudoku .4..1./...' (rows, '.' a blank, '/' between rows), response the full grid, one
    row a line: '645213\\n...'. Cells are written in a fixed order (row-major), one token per cell
    (a digit, or the newline after a row), so under `rewind` a slot ban forbids exactly one value
    at one cell. The response has no '####' line: the answer (answer_of) is the grid's 36 digits.

    Problems have exactly one solution (checked by counting to two) and at least `min_guesses`
    guess points: blank cells that allow more than one value when the fill order reaches them on the
    way to the solution (givens and earlier cells filled, later blanks open), so a solver writing
    cells in this order has to guess there. guess_points() reports them.

    verify: the resolved response is size lines of size digits, the givens kept, every row, column
    and box a permutation of 1..size. steps: one check per blank cell, its value equal to the
    solution's (a missing cell fails). search_trace(): the response of a depth-first solver, with
    its wrong values written and undone by BKs (data.inject_search).

    Splits: blanks drawn from min_blanks..max_blanks; a harder split is the same task with more
    blanks (e.g. min_blanks=20,max_blanks=22, more guess points, deeper searches).
    """
    name = "sudoku"

    def __init__(self, size=6, box_rows=2, box_cols=3, min_blanks=14, max_blanks=18, min_guesses=1,
                 n_train=20000, n_test=500):
        if box_rows * box_cols != size or not 1 <= min_blanks <= max_blanks <= size * size or size > 9:
            raise ValueError(f"sudoku: bad settings size={size}, box {box_rows}x{box_cols}, "
                             f"blanks {min_blanks}..{max_blanks}")
        self.size, self.box_rows, self.box_cols = size, box_rows, box_cols
        self.min_blanks, self.max_blanks, self.min_guesses = min_blanks, max_blanks, min_guesses
        self.n_default = dict(train=n_train, test=n_test)
        n = size
        # the cells each cell must differ from (its row, column and box), as flat indices r * n + c
        self.peers = [sorted(({r * n + j for j in range(n)} | {i * n + c for i in range(n)}
                              | {i * n + j for i in range(n) for j in range(n)
                                 if i // box_rows == r // box_rows and j // box_cols == c // box_cols}) - {r * n + c})
                      for r in range(n) for c in range(n)]

    # -- the grid: a list of size * size ints, 0 for a blank

    def allowed(self, grid, cell):
        """The values the filled peers of a cell leave it, ascending."""
        taken = {grid[j] for j in self.peers[cell]}
        return [v for v in range(1, self.size + 1) if v not in taken]

    def count_solutions(self, grid, limit=2):
        """Solutions of a grid, counted up to limit (most-constrained cell first)."""
        blanks = [i for i, v in enumerate(grid) if not v]
        if not blanks:
            return 1
        cell = min(blanks, key=lambda i: len(self.allowed(grid, i)))
        found = 0
        for v in self.allowed(grid, cell):
            grid[cell] = v
            found += self.count_solutions(grid, limit - found)
            grid[cell] = 0
            if found >= limit:
                break
        return found

    def _full_grid(self, rng):
        grid = [0] * (self.size * self.size)

        def fill(i):
            if i == len(grid):
                return True
            vals = self.allowed(grid, i)
            rng.shuffle(vals)
            for v in vals:
                grid[i] = v
                if fill(i + 1):
                    return True
            grid[i] = 0
            return False

        fill(0)
        return grid

    def _make(self, rng):
        while True:
            solution = self._full_grid(rng)
            grid = list(solution)
            for i in rng.sample(range(len(grid)), rng.randint(self.min_blanks, self.max_blanks)):
                grid[i] = 0
            if self.count_solutions(list(grid)) == 1 and len(self.guess_points(grid, solution)) >= self.min_guesses:
                return self.problem(self.format_grid(grid, "/"), solution)

    def guess_points(self, grid, solution):
        """The blank cells (flat indices) where the fill order meets more than one allowed value on
        the way to the solution."""
        g, out = list(grid), []
        for i, v in enumerate(grid):
            if not v:
                if len(self.allowed(g, i)) > 1:
                    out.append(i)
                g[i] = solution[i]
        return out

    def format_grid(self, grid, sep):
        n = self.size
        return sep.join("".join(str(v) if v else "." for v in grid[r * n:(r + 1) * n]) for r in range(n))

    def parse_question(self, question):
        """The grid (0 for a blank) of a question 'sudoku 12.4../...'."""
        rows = question.removeprefix("sudoku ").split("/")
        grid = [0 if ch == "." else int(ch) for row in rows for ch in row]
        assert len(rows) == self.size and len(grid) == self.size ** 2, f"not a {self.size}x{self.size} sudoku: {question!r}"
        return grid

    def problem(self, grid_text, solution=None):
        grid = self.parse_question(grid_text)
        if solution is None:   # a question on its own: solve it (the first solution, ascending values)
            solution = list(grid)
            self._solve(solution)
        return dict(question="sudoku " + grid_text, answer="".join(map(str, solution)),
                    solution=self.format_grid(solution, "\n"), grid=grid, cells=solution)

    def _solve(self, grid):
        blanks = [i for i, v in enumerate(grid) if not v]
        if not blanks:
            return True
        for v in self.allowed(grid, blanks[0]):
            grid[blanks[0]] = v
            if self._solve(grid):
                return True
        grid[blanks[0]] = 0
        return False

    # -- verification (of the resolved text)

    def read_grid(self, text):
        """The grid a response writes (a list of ints), or None unless it is exactly size lines of
        size digits in 1..size."""
        lines = response_lines(text)
        digits = "".join(lines)
        if len(lines) != self.size or any(len(l) != self.size for l in lines) \
                or not all("1" <= ch <= str(self.size) for ch in digits):
            return None
        return [int(ch) for ch in digits]

    def well_formed(self, text):
        return self.read_grid(text) is not None

    def answer_of(self, text):
        g = self.read_grid(text)
        return None if g is None else "".join(map(str, g))

    def valid(self, grid, p):
        """The givens of p kept and no two peers equal."""
        return all(not v or grid[i] == v for i, v in enumerate(p["grid"])) \
            and all(grid[i] != grid[j] for i in range(len(grid)) for j in self.peers[i])

    def verify(self, text, p):
        g = self.read_grid(text)
        return g is not None and self.valid(g, p)

    def steps(self, text, p):
        """One check per blank cell: the response's value there is the solution's."""
        digits = "".join(response_lines(text))
        return [i < len(digits) and digits[i] == str(p["cells"][i]) for i, v in enumerate(p["grid"]) if not v]

    def allowed_next(self, p, text):
        """The characters a checker of the rules allows next after the response text (resolved):
        the given or the newline that comes next, the values a blank cell's filled peers allow
        (none at a dead end), or, after the last cell, '' for the end. For an oracle-checked search
        (evaluate.oracle_search): it checks the rules, not the solution."""
        n = self.size
        if len(text) == n * (n + 1) - 1:
            return [""]
        if len(text) % (n + 1) == n:
            return ["\n"]
        cells = text.replace("\n", "")
        cell = len(cells)
        if p["grid"][cell]:
            return [str(p["grid"][cell])]
        grid = [int(c) for c in cells] + p["grid"][cell:]
        return [str(v) for v in self.allowed(grid, cell)]

    # -- material for data.inject_search

    def search_trace(self, p, rng, max_actions=None, prefer=None):
        """The actions of a depth-first solver that writes the response cell by cell, as a list of
        characters and None for a BK: at each blank cell it writes one of the values the filled
        peers allow (in random order, drawn anew at each visit; or in the order prefer(cell, values)
        gives, a fixed preference as a greedy decoder has), and moves on; at a blank cell with
        no value left it pops back, one BK per written token (givens and newlines too), to the
        previous blank cell, which then takes its next value, or, with none left, is popped in turn
        (the cascade). resolve(actions) is the solution. None if it needs more than max_actions."""
        n = self.size
        items = []   # per written token: a cell index (blank), or the fixed character (given, newline)
        for i, v in enumerate(p["grid"]):
            items.append(str(v) if v else i)
            if i % n == n - 1 and i < n * n - 1:
                items.append("\n")
        grid, left, actions, k = list(p["grid"]), {}, [], 0
        while k < len(items):
            if max_actions is not None and len(actions) > max_actions:
                return None
            it = items[k]
            if isinstance(it, str):
                actions.append(it)
                k += 1
                continue
            if k not in left:   # a new visit: the values allowed here now, in a random order
                left[k] = self.allowed(grid, it)
                if prefer is None:
                    rng.shuffle(left[k])
                else:
                    left[k] = list(reversed(prefer(it, left[k])))   # (taken from the end)
            if left[k]:
                grid[it] = left[k].pop()
                actions.append(str(grid[it]))
                k += 1
                continue
            del left[k]   # a dead end: pop back to the previous blank cell and free it
            while True:
                k -= 1
                assert k >= 0, "the search emptied the grid: the puzzle has no solution"
                actions.append(None)
                if not isinstance(items[k], str):
                    grid[items[k]] = 0
                    break
        assert [grid[i] for i in range(n * n)] == p["cells"], "the search found another solution"
        return actions


def read_jsonl(path, fields=()):
    """(line number, row) for each row of a JSONL file (.jsonl, or .jsonl.gz). A malformed line, or a
    row missing a string field, raises ValueError naming the file and the line, so a bad data file
    fails loudly instead of training on less."""
    rows = []
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object")
            for k in fields:
                if not isinstance(row.get(k), str):
                    raise ValueError(f"{path}:{i}: missing or non-string field {k!r}")
            rows.append((i, row))
    return rows


TASKS = dict(arith=Arith, countdown=Countdown, deps=Deps, sudoku=Sudoku, gsm8k=None)   # gsm8k: below


def task_class(name):
    """The class of the task called name. GSM8K has a room of its own (gsm8k.py, the data files and
    the calculator checks) and builds on Task above, so it is imported here, when asked for: an
    import at the top of this file would be circular."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: expected one of {sorted(TASKS)}")
    if name == "gsm8k":
        from gsm8k import GSM8K
        return GSM8K
    return TASKS[name]


def prompt_ids(tok, task, p):
    """The prompt ids of problem p, the one way every stage makes them (traces, rollouts, evaluation,
    self-errors, generation): with the tokenizer's chat template on (tok.chat), the conversation
    task.messages(p) (the user turn task.user_message(p), after any example turns) rendered by
    tok.chat_ids; else tok.encode(task.prompt(p))."""
    if getattr(tok, "chat", False):
        return tok.chat_ids(task.messages(p))
    return tok.encode(task.prompt(p))


def get_task(name="arith", **kw):
    return task_class(name)(**kw)


def checkpoint_task(meta, name="", kwargs=None):
    """The task a later stage works on: `name`/`kwargs` when given, else the one the checkpoint
    was trained on (its settings kept only when the task is the same). Returns (name, kwargs, task)."""
    name = name or meta.get("task", "arith")
    if kwargs is None:
        kwargs = meta.get("task_kwargs", {}) if name == meta.get("task") else {}
    return name, kwargs, get_task(name, **kwargs)
