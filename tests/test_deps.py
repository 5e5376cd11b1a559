"""The deps task and its retry augmentations: the verifier accepts every valid solution (any
topological order of the needed lines, distractor lines or not) and rejects every invalid one (a
line before its inputs, a wrong result, a variable written twice, a missing needed line, a wrong or
hedged answer); retry and retry_weak traces resolve to the clean response in ids and take no action
their own bans forbid under either policy (byte and gpt2 tokens); and the clean solution strictly
outscores every shortcut under the reward."""
import random

import pytest
from hypothesis import given, settings, strategies as st

import augment as aug
import data
import tasks
import tokenizer
from data import Rule, resolve
from reward import RewardConfig, is_right, score, total
from schedules import WeightSchedule
from tasks.deps import Deps

TOKS = {name: tokenizer.get_tokenizer(name) for name in ("byte", "gpt2")}
FAST = settings(max_examples=60, deadline=None)


@st.composite
def deps_problems(draw):
    lo = draw(st.integers(1, 5))
    task = Deps(min_vars=lo, max_vars=lo + draw(st.integers(0, 2)), distractors=draw(st.integers(0, 3)),
                ops=draw(st.sampled_from(["+-", "+-*", "*", "-"])))
    return task, task._make(random.Random(draw(st.integers(0, 2 ** 32))))


def inputs(p, v):
    return Deps.inputs(p["defs"][v])


def topo_order(p, variables, rnd):
    """A random topological order of `variables` (closed under inputs)."""
    left, out = set(variables), []
    while left:
        ready = sorted(v for v in left if all(x in out for x in inputs(p, v)))
        v = rnd.choice(ready)
        out.append(v)
        left.remove(v)
    return out


def with_distractors(p, rnd):
    """The needed variables plus a random set of the others, closed under inputs."""
    chosen = set(p["needed"]) | {v for v in p["defs"] if rnd.random() < 0.5}
    stack = list(chosen)
    while stack:
        for x in inputs(p, stack.pop()):
            if x not in chosen:
                chosen.add(x)
                stack.append(x)
    return chosen


def lines_of(p, order):
    return [Deps.line(v, p["defs"], p["values"]) for v in order]


def text(lines, answer):
    return "\n".join(list(lines) + [f"#### {answer}"])

# -----------------------------------------------------------------------------
# the task


def test_example_and_format():
    task = tasks.get_task("deps")
    p = task.problem("n=s+4;v=n+s;s=6;d=v-1;?v")
    assert p["solution"] == "s=6\nn=s+4=6+4=0\nv=n+s=0+6=6\n#### 6"
    assert p["answer"] == "6" and p["query"] == "v" and p["order"] == ["s", "n", "v"]
    assert p["needed"] == ["n", "s", "v"] and p["values"]["d"] == 5
    assert task.prompt(p) == "n=s+4;v=n+s;s=6;d=v-1;?v\n"
    assert task.verify(p["solution"], p) and task.verify(p["solution"] + tokenizer.EOT_TEXT, p)
    assert task.steps(p["solution"], p) == [True, True, True]
    assert task.verify("s=6\nn=s+4=6+4=0\nd=v-1=6-1=5\nv=n+s=0+6=6\n#### 6", p) is False   # d before v
    assert task.verify("s=6\nn=s+4=6+4=0\nv=n+s=0+6=6\nd=v-1=6-1=5\n#### 6", p)           # a distractor line
    assert task.steps("n=s+4=6+4=0\ns=6\nv=n+s=0+6=6\n#### 6", p) == [False, True, False, False, False]
    assert task.steps("#### 6", p) == [False, False, False]                                # never empty
    assert task.steps("s=6\nv=n+s=0+6=6\n#### 6", p) == [True, False, False, False]        # n skipped
    assert task.slip(p, random.Random(0)) != p["solution"]
    assert "deps" in tasks.TASKS and isinstance(tasks.get_task("deps", vars=3), Deps)


def test_generated_problems_are_solved_by_their_solutions():
    for kw in (dict(), dict(min_vars=1, max_vars=1, distractors=0), dict(min_vars=6, max_vars=8, distractors=3,
                                                                          ops="+-*")):
        task = tasks.get_task("deps", **kw)
        for p in task.problems("train", n=200):
            assert task.verify(p["solution"], p) and all(task.steps(p["solution"], p)), p["question"]
            assert kw.get("min_vars", task.min_vars) <= len(p["needed"]) <= kw.get("max_vars", task.max_vars)
            assert len(p["defs"]) == len(p["needed"]) + task.distractors
            assert all(0 <= x <= 9 for x in p["values"].values()) and p["order"][-1] == p["query"]
            assert task.problem(p["question"]) == p   # the question alone determines the problem


def test_splits_disjoint_and_longer_split_never_trained():
    task = tasks.get_task("deps")
    tr, te = task.problems("train", n=3000), task.problems("test")
    assert {p["question"] for p in tr}.isdisjoint(p["question"] for p in te)
    assert len({p["question"] for p in te}) == len(te) == 500 and not any(task.is_test(p) for p in tr)
    longer = tasks.get_task("deps", min_vars=task.max_vars + 1, max_vars=task.max_vars + 2)
    assert {p["question"] for p in tr}.isdisjoint(p["question"] for p in longer.problems("test", n=200))


@FAST
@given(deps_problems(), st.randoms(use_true_random=False))
def test_verifier_accepts_every_valid_order(tp, rnd):
    task, p = tp
    for order in (topo_order(p, p["needed"], rnd), topo_order(p, with_distractors(p, rnd), rnd)):
        t = text(lines_of(p, order), p["answer"])
        assert task.verify(t, p), t
        assert task.steps(t, p) == [True] * len(order)


@FAST
@given(deps_problems(), st.randoms(use_true_random=False))
def test_verifier_rejects_every_invalid_variant(tp, rnd):
    task, p = tp
    order = topo_order(p, with_distractors(p, rnd) if rnd.random() < 0.5 else p["needed"], rnd)
    lines, ans = lines_of(p, order), p["answer"]
    bad = {}
    exprs = [i for i, v in enumerate(order) if inputs(p, v)]
    if exprs:   # a line moved before its first input
        i = rnd.choice(exprs)
        j = min(order.index(x) for x in inputs(p, order[i]))
        bad["before_inputs"] = lines[:j] + [lines[i]] + lines[j:i] + lines[i + 1:]
    i = rnd.randrange(len(lines))   # a wrong result (the last digit of the line)
    bad["wrong_result"] = lines[:i] + [lines[i][:-1] + str((int(lines[i][-1]) + rnd.randint(1, 9)) % 10)] + lines[i + 1:]
    j = rnd.randint(i + 1, len(lines))   # a line written twice
    bad["twice"] = lines[:j] + [lines[i]] + lines[j:]
    need = [k for k, v in enumerate(order) if v in p["needed"]]
    k = rnd.choice(need)   # a needed line left out
    bad["missing"] = lines[:k] + lines[k + 1:]
    for name, ls in bad.items():
        t = text(ls, ans)
        assert not task.verify(t, p) and not all(task.steps(t, p)), (name, t)
    wrong = str((int(ans) + rnd.randint(1, 9)) % 10)
    assert not task.verify(text(lines, wrong), p)
    for hedge in (text(lines, wrong) + f"\n#### {ans}", text(lines, ans) + f"\n#### {ans}",
                  text(lines, ans) + f"\n#### {wrong}"):
        assert not task.verify(hedge, p), hedge
    assert not task.verify("\n".join(lines), p)   # no answer line
    assert all(task.steps(text(lines, ans), p))


@FAST
@given(deps_problems(), st.integers(0, 2 ** 32))
def test_slip_is_wrong_and_well_formed(tp, seed):
    task, p = tp
    s = task.slip(p, random.Random(seed))
    assert s != p["solution"] and task.well_formed(s) and not all(task.steps(s, p))
    assert len(s.split("\n")) == len(p["solution"].split("\n"))


@FAST
@given(deps_problems(), st.sampled_from(["retry", "retry_weak"]))
def test_retry_options_are_what_they_say(tp, kind):
    task, p = tp
    order = p["order"]
    for k in range(len(order) + 1):
        done = set(order[:k])
        for alts in task.retry_options(p, k, kind):
            v = alts[0][0]
            assert all(a.startswith(v + "=") for a in alts) and v not in done
            if kind == "retry":
                assert not all(x in done for x in inputs(p, v))
            else:
                assert v in order[k + 1:]



@FAST
@given(deps_problems())
def test_search_path_is_a_depth_first_search(tp):
    """Read in order, a search trace's attempts and lines are a depth-first search that only ever
    looks one definition ahead: every attempt is the variable the search stands on, with an input
    not yet computed, and the next attempt (or line) is that input; a line is written once all its
    inputs are, and the lines are the clean order. Nothing is attempted before the answer line."""
    task, p = tp
    done, stack = set(), [p["query"]]
    for k, v in enumerate(p["order"]):
        for a in task.search_path(p, k):
            u, d = a.split("=", 1)
            missing = [x for x in inputs(p, u) if x not in done]
            assert u == stack[-1] and d == p["defs"][u] and missing
            stack.append(missing[0])
        assert stack.pop() == v and all(x in done for x in inputs(p, v))
        done.add(v)
    assert not stack and task.search_path(p, len(p["order"])) == []

# -----------------------------------------------------------------------------
# retry augmentations


def retries_of(tok, response):
    """(resolved prefix text, deleted text) of each run of BKs in a response."""
    bk, out, stack, i = tok.bk_id, [], [], 0
    while i < len(response):
        if response[i] != bk:
            stack.append(response[i])
            i += 1
            continue
        n = 0
        while i < len(response) and response[i] == bk:
            n, i = n + 1, i + 1
        out.append((tok.decode(stack[:-n]), tok.decode(stack[-n:])))
        del stack[-n:]
    return out


def banned_actions(trace, bk, policy, cap):
    L = data.layout(trace, bk, Rule(policy), max_backtracks=cap)
    return [(i, t) for i, (t, b) in enumerate(zip(L["tgt"], L["bans"])) if t in b]


@settings(max_examples=40, deadline=None)
@given(deps_problems(), st.sampled_from(aug.RETRY_KINDS), st.sampled_from(sorted(TOKS)),
       st.one_of(st.none(), st.integers(0, 12)), st.integers(0, 2 ** 32))
def test_retry_traces_resolve_and_take_no_banned_action(tp, kind, tokname, cap, seed):
    task, p = tp
    tok = TOKS[tokname]
    clean = tok.encode(p["solution"]) + [tok.eot_id]
    out = aug.inject_retry(tok, task, p, random.Random(seed), kind, retry_rate=1.0, max_backtracks=cap)
    if kind == "search":   # a whole path of attempts goes in, or nothing
        starts = [sum(len(tok.encode(a)) for a in task.search_path(p, k)) for k in range(len(p["order"]) + 1)
                  if task.search_path(p, k)]
    else:
        starts = [len(tok.encode(a)) for k in range(len(p["order"]) + 1)
                  for alts in task.retry_options(p, k, kind) for a in alts]
    if out is None:   # nothing to retry (e.g. one constant to compute), or nothing fits the cap
        assert not starts or cap is not None and cap < min(starts)
        return
    assert resolve(out, tok.bk_id) == clean and out[-1] == tok.eot_id and tok.eot_id not in out[:-1]
    n_bk = out.count(tok.bk_id)
    assert n_bk > 0 and (cap is None or n_bk <= cap)
    for policy in ("rewind", "keep"):
        assert banned_actions(data.Trace(tok.encode(task.prompt(p)), out), tok.bk_id, policy, cap) == [], policy
    order = p["order"]
    for before, wrong in retries_of(tok, out):
        # each retry starts a line, names a variable that cannot (retry) or may not yet (retry_weak)
        # be written there, and is not the line that follows
        assert before == "" or before.endswith("\n")
        k = before.count("\n")
        v, done = wrong[0], set(order[:k])
        if kind == "search":   # a whole attempt: 'v=def', v with an input not computed yet
            assert wrong == f"{v}={p['defs'][v]}" and v not in done
        else:
            assert wrong in (f"{v}=", f"{v}={p['defs'][v]}=") and v not in done
        if kind in ("retry", "search"):
            assert not all(x in done for x in inputs(p, v))
        else:
            assert v in order[k + 1:]
    if cap is None and kind == "retry":   # rate 1.0: every line that has a candidate gets a retry
        eligible = sum(1 for k in range(len(order) + 1) if task.retry_options(p, k, kind))
        assert len(retries_of(tok, out)) == eligible
    if cap is None and kind == "search":   # rate 1.0: every attempt of the search is written
        assert [w for _, w in retries_of(tok, out)] == [a for k in range(len(order) + 1) for a in task.search_path(p, k)]


@pytest.mark.parametrize("tokname", sorted(TOKS))
@pytest.mark.parametrize("augment", ["retry", "retry_weak", ["retry", "retry_weak", "lcs"]])
def test_build_traces_with_retry(tokname, augment):
    tok = TOKS[tokname]
    task = tasks.get_task("deps")
    problems = task.problems("train", n=40, seed=2)
    for rate in (0.0, 0.5, 1.0):
        tr = aug.build_traces(tok, task, problems, random.Random(3), backtrack_ratio=0.75, max_backtracks=8,
                               augment=augment, retry_rate=rate)
        assert len(tr) == 40 and sum(tok.bk_id in t.response for t in tr) == 30
        for t, p in zip(tr, problems):
            assert resolve(t.response, tok.bk_id) == tok.encode(p["solution"]) + [tok.eot_id]
            assert t.meta["n_bk"] == t.response.count(tok.bk_id) <= 8
            assert (t.meta["augment"] == "clean") == (t.meta["n_bk"] == 0)
            for policy in ("rewind", "keep"):
                assert banned_actions(t, tok.bk_id, policy, 8) == []
        kinds = {t.meta["augment"] for t in tr} - {"clean"}
        assert kinds <= ({"retry", "retry_weak", "lcs", "plausible"})
        if augment == "retry":   # plausible only where nothing can be retried (e.g. constants only)
            assert kinds <= {"retry", "plausible"} and sum(t.meta["augment"] == "retry" for t in tr) >= 20
            for t, p in zip(tr, problems):
                if t.meta["augment"] == "plausible":
                    assert not any(task.retry_options(p, k, "retry") for k in range(len(p["order"]) + 1))


def test_retry_falls_back_to_plausible_without_options():
    tok = TOKS["byte"]
    arith = tasks.get_task("arith")
    problems = arith.problems("train", n=20)
    for kind in aug.RETRY_KINDS:
        tr = aug.build_traces(tok, arith, problems, random.Random(0), backtrack_ratio=1.0, augment=kind)
        assert {t.meta["augment"] for t in tr} == {"plausible"}
        assert aug.inject_retry(tok, arith, problems[0], random.Random(0), kind) is None
    # a cap too small for any wrong beginning ('v=' is two byte tokens): plausible instead
    deps = tasks.get_task("deps")
    tr = aug.build_traces(tok, deps, deps.problems("train", n=20), random.Random(0), backtrack_ratio=1.0,
                           max_backtracks=1, augment="retry")
    assert {t.meta["augment"] for t in tr} == {"plausible"} and all(t.meta["n_bk"] == 1 for t in tr)
    # 'mixed' is unchanged: plausible, random and lcs only
    assert aug.MIXED == ("plausible", "random", "lcs")

# -----------------------------------------------------------------------------
# rewards


TOK = TOKS["byte"]
BK, EOT = TOK.bk_id, TOK.eot_id
DP = tasks.get_task("deps").problem("n=s+4;v=n+s;s=6;d=v-1;?v")   # s=6 / n=s+4=6+4=0 / v=n+s=0+6=6 / #### 6


def trace(*parts):
    """Text pieces and BK markers ('<'), ending in end-of-text unless the last part is '|cut'."""
    out = []
    for x in parts:
        out += [] if x == "|cut" else [BK] if x == "<" else TOK.encode(x)
    return out if parts and parts[-1] == "|cut" else out + [EOT]


def deps_rows():
    clean = DP["solution"]
    s, n, v, a = clean.split("\n")
    return {
        "clean": trace(clean),
        "answer_only": trace(a),
        "skip_first_step": trace(f"{n}\n{v}\n{a}"),
        "skip_middle_step": trace(f"{s}\n{v}\n{a}"),
        "skip_last_step": trace(f"{s}\n{n}\n{a}"),
        "out_of_order": trace(f"{n}\n{s}\n{v}\n{a}"),
        "hedged": trace(f"{s}\n{n}\n{v}\n#### 5\n{a}"),
        "answer_twice": trace(clean + "\n" + a),
        "step_after_answer": trace(clean + "\n" + s),
        "repeated_line": trace(f"{s}\n{s}\n{n}\n{v}\n{a}"),
        "solution_twice": trace(clean + "\n" + clean),
        "wrong": trace("s=6\nn=s+4=6+4=1\nv=n+s=1+6=7\n#### 7"),
        "wrong_answer_right_steps": trace(f"{s}\n{n}\n{v}\n#### 7"),
        "right_answer_wrong_step": trace("s=6\nn=s+4=6+4=1\nv=n+s=0+6=6\n#### 6"),
        "failed_fix": trace("s=6\nn=s+4=6+4=1", "<", "2\nv=n+s=2+6=8\n#### 8"),
        "failed_retry": trace("v=", "<", "<", "s=6\nn=s+4=6+4=1\nv=n+s=1+6=7\n#### 7"),
        "bk_spam_retype": trace(*[x for l in clean.split("\n") for x in (l, "<", l[-1], "\n")][:-1]),
        "empty": [EOT],
        "nothing": [],
        "truncated": trace(clean, "|cut"),
        "truncated_mid_step": trace("s=6\nn=s+4=6+", "|cut"),
        # right in the end, through a backtrack: below clean, above everything wrong
        "slip_fixed": trace("s=6\nn=s+4=6+4=1", "<", "0\nv=n+s=0+6=6\n#### 6"),
        "retry": trace("v=n+s=", *["<"] * 6, clean),
        "retry_weak": trace(f"{s}\n", "v=", "<", "<", f"{n}\n{v}\n{a}"),
    }


FIXED = ("slip_fixed", "retry", "retry_weak")


@pytest.mark.parametrize("budget", [None, 8.0, 2.0])
def test_deps_reward_ranks_clean_first_then_fixes_then_the_rest(budget):
    rows = deps_rows()
    w, rc = WeightSchedule.from_string("constant").at(0), RewardConfig()
    task = tasks.get_task("deps")
    sc = {name: score(task, TOK, DP, r, budget, rc) for name, r in rows.items()}
    got = {name: total(c, w) for name, c in sc.items()}
    best = got.pop("clean")
    assert all(x < best for x in got.values()), got
    # a right answer reached by a correction (a slip fixed, a retry) beats every wrong completion
    worst_fix = min(got[k] for k in FIXED)
    wrong = [k for k in got if not sc[k]["right"]]
    assert set(wrong) == set(got) - set(FIXED) - {"truncated", "bk_spam_retype"}
    assert all(got[k] < worst_fix for k in wrong), got


def test_deps_shortcuts_fail_the_checks_they_skip():
    task, rows = tasks.get_task("deps"), deps_rows()
    c = score(task, TOK, DP, rows["clean"])
    assert (c["outcome"], c["process"], c["backtrack"], c["format"]) == (1.0, 1.0, 1.0, 1.0)
    for name in ("answer_only", "skip_first_step", "skip_middle_step", "skip_last_step", "out_of_order",
                 "repeated_line", "right_answer_wrong_step"):
        c = score(task, TOK, DP, rows[name])
        assert c["outcome"] == 0.0 and c["process"] < 1.0 and not c["right"] and c["backtrack"] == 0.0, name
    for name in ("hedged", "answer_twice", "step_after_answer", "solution_twice"):
        c = score(task, TOK, DP, rows[name])
        assert c["outcome"] == 0.0 and c["format"] == 0.5 and not c["right"], name
    for name in FIXED:
        c = score(task, TOK, DP, rows[name])
        assert c["right"] and not c["draft_right"] and c["fixed"], name
    # a line for a distractor is allowed: right, like the clean solution (it is valid work)
    assert is_right(task, "s=6\nn=s+4=6+4=0\nv=n+s=0+6=6\nd=v-1=6-1=5\n#### 6", DP)


def test_every_generated_deps_solution_scores_full():
    task = tasks.get_task("deps")
    for p in task.problems("train", n=50):
        c = score(task, TOK, p, trace(p["solution"]))
        assert c["right"] and (c["outcome"], c["process"], c["backtrack"], c["format"]) == (1.0, 1.0, 1.0, 1.0)
