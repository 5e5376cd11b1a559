"""
The GSM8K task: grade-school math word problems, their files, and the checks of a solution's
arithmetic (the <<a*b=c>> calculator annotations, or equations in the text). tasks.get_task("gsm8k")
returns it; the shared parts (Task, the one answer parser) are tasks/base.py's and tasks/answers.py's.

The repository ships the train and test splits and example model solutions, gzipped, in
assets/gsm8k/ (MIT licence, see the LICENSE file there); your own JSONL files work too
(--task_kwargs=path=... or data_dir=...).
"""
import os
import random
import re
import unicodedata
from fractions import Fraction

from tasks.answers import normalize_number
from common import read_jsonl
from tasks.base import Task, apply_op
from tokenizer import EOT_TEXT

# assets/ is at the repository root, one folder above this package
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K_DIR = os.path.join(ROOT, "assets", "gsm8k")


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
            v = apply_op(take(), v, atom())
        return v

    def expr():
        v = term()
        while peek() in ("+", "-"):
            v = apply_op(take(), v, term())
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

    Evaluation protocol (heldout.evaluate, evaluate.py):
    - Prompt. A checkpoint whose tokenizer has a chat template is prompted zero-shot in chat format,
      chain of thought: one user turn holding the question and INSTRUCTION (reason step by step, end
      with '#### <answer>'), rendered with the checkpoint's own template (tasks.prompt_ids; --chat=False
      turns it off). Without a template the prompt is 'Question: ...\nAnswer:\n'. shots=N
      (--task_kwargs=shots=N) puts N train-split problems first, as example turns with their reference
      solutions (in the plain format: as Question/Answer blocks).
    - Scoring, on the resolved text: acc is verify (the one '####' line is the last one and holds the
      answer: what training teaches); strict_acc reads the number after the last '####' or "The answer
      is"; lenient_acc reads the last number anywhere in the text. Published instruct baselines and
      community GRPO numbers differ by this choice, so all three are reported.
    - Decoding: greedy and one sample at T=1 per problem (held_out_eval, evaluate.py), as for every task.
    """
    name = "gsm8k"
    INSTRUCTION = ("Solve the problem step by step. Then write the final answer on the last line, "
                   "as '#### <answer>' with the number only.")

    def __init__(self, path=None, data_dir=None, calc="strip", test_path=None, shots=0):
        assert calc in ("strip", "annotated"), f"calc must be 'strip' or 'annotated', not {calc!r}"
        assert isinstance(shots, int) and shots >= 0, f"shots must be a number >= 0, not {shots!r}"
        self.calc, self.shots, self._examples = calc, shots, None
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

    def examples(self, p):
        """The `shots` worked examples put before p: the first train-split problems (in file order),
        p's own question never among them."""
        if not self.shots:
            return []
        if self._examples is None:
            self._examples = self.problems("train")[:self.shots + 1]
        return [e for e in self._examples if e["question"] != p["question"]][:self.shots]

    def prompt(self, p):
        shots = "".join(f"Question: {e['question']}\nAnswer:\n{e['solution']}\n\n" for e in self.examples(p))
        return shots + f"Question: {p['question']}\nAnswer:\n"

    def user_message(self, p):
        return f"{p['question']}\n\n{self.INSTRUCTION}"

    def messages(self, p):
        turns = []
        for e in self.examples(p):
            turns += [dict(role="user", content=self.user_message(e)), dict(role="assistant", content=e["solution"])]
        return turns + [dict(role="user", content=self.user_message(p))]

    _STRICT = re.compile(r"(?:####|[Tt]he answer is)[:\s]*(-?\$?\s*\d[\d,]*(?:\.\d+)?)")
    _ANY_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")

    def scores(self, text, p):
        """strict: the number right after the last '####' or "The answer is" is the answer; lenient:
        the last number in the text is (both up to end-of-text, normalized by normalize_number)."""
        text = text.split(EOT_TEXT)[0]
        strict = self._STRICT.findall(text)
        lenient = self._ANY_NUMBER.findall(text)
        return dict(strict=bool(strict) and normalize_number(strict[-1]) == p["answer"],
                    lenient=bool(lenient) and normalize_number(lenient[-1]) == p["answer"])

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
