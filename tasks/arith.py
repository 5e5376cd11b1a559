"""
Arith: multi-step arithmetic on a running total, the default task (tiny models learn it in minutes).
"""
import re

from tasks.answers import response_lines
from tasks.base import SyntheticTask, apply_op


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
