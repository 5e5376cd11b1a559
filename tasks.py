"""
Tasks: where problems come from, how they are prompted, and exact verifiers of a response's text.

A problem is a dict with at least 'question', 'answer' (canonical, as parse_answer returns it) and
'solution' (the clean response text, without end-of-text, ending in a '#### <answer>' line). The
response follows task.prompt(problem) directly. Every verifier reads the RESOLVED text (BKs
applied, docs/backtrack-semantics.md §1), through the one answer parser below.

    arith      multi-step arithmetic on a running total (the default; tiny models learn it in minutes)
    countdown  reach a target from given numbers; any valid solution is accepted
    gsm8k      grade-school math word problems (assets/gsm8k, MIT licence; or your own JSONL files)
"""
import gzip
import hashlib
import json
import os
import random
import re
import unicodedata
from fractions import Fraction

from tokenizer import EOT_TEXT

GSM8K_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "gsm8k")

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
# The response follows task.prompt(problem) directly.


class Task:
    name = "task"

    def problems(self, split, n=None, seed=0):
        raise NotImplementedError

    def prompt(self, p):
        return p["question"] + "\n"

    def verify(self, text, p):
        """The answer is right and the response is well formed (one '####' line, the last)."""
        return self.well_formed(text) and parse_answer(text) == p["answer"]

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


def _apply(op, a, b):
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
                if 0 <= _apply(op, total, b) <= self.max_value:
                    break
            else:
                op, b = "-", min(total, self.hi)
            total = _apply(op, total, b)
            nums.append(b); ops.append(op)
        return self.problem(nums, ops)

    def problem(self, nums, ops):
        q = str(nums[0]) + "".join(op + str(b) for op, b in zip(ops, nums[1:]))
        lines, total = [], nums[0]
        for op, b in zip(ops, nums[1:]):
            c = _apply(op, total, b)
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
            out.append(a == prev and op == p["ops"][k] and b == p["nums"][k + 1] and _apply(op, a, b) == c)
            prev = c
        return out

    def slip(self, p, rng):
        """One step's result off by a little, and the steps after it carried on from the wrong total."""
        nums, ops = p["nums"], p["ops"]
        k = rng.randrange(len(ops))
        lines, total = [], nums[0]
        for i, (op, b) in enumerate(zip(ops, nums[1:])):
            c = _apply(op, total, b)
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
                c = int(_apply(op, Fraction(a), Fraction(b)))
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
                        good = _apply(op, a, b) == c
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


def split_file(folder, split):
    """folder/<split>.jsonl, or its gzipped copy (the repository ships GSM8K gzipped)."""
    plain = os.path.join(folder, f"{split}.jsonl")
    return plain if os.path.exists(plain) or not os.path.exists(plain + ".gz") else plain + ".gz"


def normalize_question(q):
    """Question text for leak checks: unicode-folded, lowercased, whitespace collapsed."""
    q = unicodedata.normalize("NFKC", q).replace("\u2019", "'").replace("\u2018", "'")
    return " ".join(q.lower().split())


_CALC = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
_NUM_TXT = r"\$?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)%?"
_EQ_TXT = re.compile(rf"(?<![\d.])((?:\(\s*)*{_NUM_TXT}(?:\s*\))*(?:\s*[-+*/x×÷]\s*(?:\(\s*)*{_NUM_TXT}(?:\s*\))*)+)"
                     rf"\s*=\s*(-?{_NUM_TXT})")


def eval_expr(s):
    """Exact value (Fraction) of an arithmetic expression: numbers (with $ , %), + - * / x ( )."""
    toks = re.findall(r"(?:\d+(?:\.\d*)?|\.\d+)%?|[-+*/x×÷()]", s.replace(",", "").replace("$", ""))
    if "".join(toks) != re.sub(r"\s", "", s.replace(",", "").replace("$", "")):
        raise ValueError(f"not an arithmetic expression: {s!r}")
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else None

    def take():
        nonlocal pos
        pos += 1
        return toks[pos - 1]

    def atom():
        t = take() if peek() is not None else None
        if t == "(":
            v = expr()
            if take() != ")":
                raise ValueError("unbalanced parentheses")
            return v
        if t in ("-", "+"):
            return -atom() if t == "-" else atom()
        if t is None or not (t[0].isdigit() or t[0] == "."):
            raise ValueError(f"expected a number in {s!r}")
        return Fraction(t[:-1]) / 100 if t.endswith("%") else Fraction(t)

    def term():
        v = atom()
        while peek() in ("*", "/", "x", "×", "÷"):
            v = _apply(take(), v, atom())
        return v

    def expr():
        v = term()
        while peek() in ("+", "-"):
            v = _apply(take(), v, term())
        return v

    try:
        v = expr()
    except IndexError:
        raise ValueError(f"incomplete expression {s!r}") from None
    if pos != len(toks):
        raise ValueError(f"trailing tokens in {s!r}")
    return v


def check_equation(expr, value):
    """expr evaluates to value; a value written with d decimals may be rounded to d decimals.
    'x = 75%' is right whether x is 75 or 0.75 (both ways of writing a percentage occur)."""
    v = normalize_number(value.replace("%", ""))
    if v is None:
        return False
    try:
        got = eval_expr(expr)
    except (ValueError, ZeroDivisionError):
        return False
    tol = Fraction(1, 2 * 10 ** len(v.partition(".")[2]))
    wants = [Fraction(v)] + ([Fraction(v) / 100] if value.strip().endswith("%") else [])
    return any(abs(got - w) <= tol for w in wants)


class GSM8K(Task):
    """Grade-school math word problems from JSONL rows with 'question' and 'answer' (the reasoning,
    then '#### <final answer>').

    calc='strip' drops the <<a*b=c>> calculator annotations from the solution text, 'annotated'
    leaves them in. The training split drops (and counts in self.dropped) any question whose normalized text
    is in the test file, and check_train raises if one gets in another way.
    """
    name = "gsm8k"

    def __init__(self, path=None, data_dir=None, calc="strip", test_path=None):
        assert calc in ("strip", "annotated"), f"calc must be 'strip' or 'annotated', not {calc!r}"
        self.calc = calc
        d = data_dir or (path if path and os.path.isdir(path) else None)
        d = d or GSM8K_DIR
        self.file = path if path and not os.path.isdir(path) else None  # one file for every split
        where = self.file or d
        if not os.path.exists(where):
            raise FileNotFoundError(f"gsm8k data not found at {where!r} (task_kwargs path= a JSONL file, or data_dir= "
                                    "a folder with train.jsonl and test.jsonl)")
        self.data_dir = d
        self.test_path = test_path or split_file(d, "test")
        self.dropped = 0
        self._test_questions = None

    def solution_text(self, answer):
        body, _, final = answer.rpartition("####")
        body = body.strip()
        if self.calc == "strip":
            body = _CALC.sub("", body)
        return body, normalize_number(final)

    def problems(self, split, n=None, seed=0):
        assert split in ("train", "test"), f"unknown split {split!r}"
        path = self.file or split_file(self.data_dir, split)
        out = []
        for i, row in read_jsonl(path, fields=("question", "answer")):
            body, ans = self.solution_text(row["answer"])
            if "####" not in row["answer"] or ans is None:
                raise ValueError(f"{path}:{i}: answer has no '#### <number>' line")
            out.append(dict(question=row["question"].strip(), answer=ans,
                            solution=(body + "\n" if body else "") + f"#### {ans}", line=i))
        if split == "train":
            n0 = len(out)
            out = [p for p in out if not self.is_test(p)]
            self.dropped = n0 - len(out)
        if n is not None and n < len(out):
            out = random.Random(f"{self.name}:{split}:{seed}").sample(out, n)
        return out

    def is_test(self, p):
        if self._test_questions is None:
            if not os.path.exists(self.test_path):  # nothing to check against (a custom data set)
                self._test_questions = set()
            else:
                rows = read_jsonl(self.test_path, fields=("question",))
                self._test_questions = {normalize_question(r["question"]) for _, r in rows}
        return normalize_question(p["question"]) in self._test_questions

    def prompt(self, p):
        return f"Question: {p['question']}\nAnswer:\n"

    def steps(self, text, p):
        """One bool per equation: each <<expr=value>> annotation when the text has them, else each
        'a op b = c' written in the text, evaluated exactly (c may be rounded to its decimals)."""
        text = text.split(EOT_TEXT)[0].rsplit("####", 1)[0]
        if _CALC.search(text):
            return [check_equation(e, v) for e, v in _CALC.findall(text)]
        return [check_equation(e, v) for e, v in _EQ_TXT.findall(text)]

    def slip(self, p, rng):
        """The solution with one computed result (after '=') replaced by a near miss."""
        sol = p["solution"]
        spots = [m for m in re.finditer(r"=\s*\$?(\d+)", sol)]
        if not spots:
            return None
        m = rng.choice(spots)
        v = int(m[1])
        w = v + rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if v + d >= 0])
        return sol[:m.start(1)] + str(w) + sol[m.end(1):]


def example_solution_pairs(path=None, calc="strip"):
    """(question, wrong, right) from example_model_solutions.jsonl: every model solution marked
    incorrect, paired with the ground truth, both rewritten in the gsm8k solution format (the
    final 'A: N' line becomes '#### N'; calc annotations stripped or kept). These are GSM8K *test*
    questions: material for measuring and testing the lcs augmentation, never for training."""
    path = path or split_file(GSM8K_DIR, "example_model_solutions")

    def fmt(s):
        s = s.strip()
        if calc == "strip":
            s = _CALC.sub("", s)
        lines = s.split("\n")
        if lines and lines[-1].startswith("A:"):
            a = normalize_number(lines[-1][2:]) or lines[-1][2:].strip()
            lines[-1] = f"#### {a}"
        return "\n".join(lines)

    out = []
    for i, row in read_jsonl(path, fields=("question", "ground_truth")):
        for k, v in row.items():
            if isinstance(v, dict):
                if not isinstance(v.get("solution"), str) or "is_correct" not in v:
                    raise ValueError(f"{path}:{i}: {k!r} needs 'solution' and 'is_correct'")
                if not v["is_correct"]:
                    out.append((row["question"], fmt(v["solution"]), fmt(row["ground_truth"])))
    return out


TASKS = dict(arith=Arith, countdown=Countdown, gsm8k=GSM8K)


def get_task(name="arith", **kw):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: expected one of {sorted(TASKS)}")
    return TASKS[name](**kw)


def checkpoint_task(meta, name="", kwargs=None):
    """The task a later stage works on: `name`/`kwargs` when given, else the one the checkpoint
    was trained on (its settings kept only when the task is the same). Returns (name, kwargs, task)."""
    name = name or meta.get("task", "arith")
    if kwargs is None:
        kwargs = meta.get("task_kwargs", {}) if name == meta.get("task") else {}
    return name, kwargs, get_task(name, **kwargs)
