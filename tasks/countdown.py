"""
Countdown: reach a target from given numbers with + - * /; any valid solution is accepted.
"""
import re
from fractions import Fraction

from tasks.answers import parse_answer, response_lines
from tasks.base import SyntheticTask, apply_op

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
