"""
Deps: evaluate a variable through a small dependency graph, the task the retry and search data
(data.inject_retry) are made for: the class generates and verifies problems, and also names the
wrong line beginnings a retry writes and the attempts a depth-first search makes.
"""
from tasks.answers import parse_answer, response_lines
from tasks.base import SyntheticTask, apply_op


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
        defs = self._needed_defs(rng, need)
        defs.update(self._distractor_defs(rng, need, extra))   # after the needed ones (rng order)
        shown = list(defs)
        rng.shuffle(shown)
        question = ";".join(f"{v}={defs[v]}" for v in shown) + f";?{need[-1]}"
        return self.problem(question)

    def _needed_defs(self, rng, need):
        """Definitions of the variables need (a topological order, the query last) in which every
        variable but the query is an input of a later one, so the query needs them all."""
        k = len(need)
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
        return defs

    def _distractor_defs(self, rng, need, extra):
        """Definitions of the distractors extra: constants, or expressions of variables defined
        before them. Nothing the query needs reads them."""
        defs = {}
        for j, v in enumerate(extra):
            pool = need + extra[:j]
            r = rng.random()
            defs[v] = str(rng.randint(0, 9)) if r < 0.3 else self._expr(rng, rng.sample(pool, 1 if r < 0.65 else 2)
                                                                     if len(pool) > 1 else pool[:1])
        return defs

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

    # -- material for data.inject_retry (methods: data.py finds them on the task by name, so a task
    #    without them simply has no retry data)

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
