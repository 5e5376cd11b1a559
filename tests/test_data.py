"""Data tests: resolve and roles against a reference, augmentations keep resolve(trace) == clean in
token ids (byte and gpt2), layouts count right, tasks verify exactly, bad data fails loudly, and
no GSM8K test question reaches training data."""
import json
import os
import random

import pytest
from hypothesis import given, settings, strategies as st

import augment as aug
import data
import tasks
import schedules
import tokenizer
from data import BK, ERROR, FINAL, Rule, resolve, roles
from tasks import answers, gsm8k
from common import read_jsonl
from conftest import ROOT

GSM8K_DIR = os.path.join(ROOT, "assets", "gsm8k")
EXAMPLES = os.path.join(GSM8K_DIR, "example_model_solutions.jsonl.gz")
BKID = 9  # small alphabets make collisions (and so interesting traces) likely
FAST = settings(max_examples=60, deadline=None)


@pytest.fixture(scope="module")
def byte_tok():
    return tokenizer.Tokenizer("byte")


@pytest.fixture(scope="module")
def gpt2_tok():
    return tokenizer.Tokenizer("gpt2")


def reference_resolve(ids, bk):
    # a deliberately different algorithm: remove the first BK and the token before it, repeatedly
    seq = list(ids)
    while bk in seq:
        i = seq.index(bk)
        del seq[max(i - 1, 0):i + 1]  # i == 0: a BK on an empty response only removes itself
    return seq


traces = st.lists(st.integers(0, BKID), max_size=40)
plain = st.lists(st.integers(0, BKID - 1), max_size=40)

# -----------------------------------------------------------------------------
# resolve and roles


def test_resolve_examples():
    a, b, c, e, f = 1, 2, 3, 5, 6
    assert resolve([a, b, c, BKID, BKID, e, f], BKID) == [a, e, f]
    assert resolve([1, 2, 3, 4, BKID, BKID, BKID, 5, 6, BKID, 7], BKID) == [1, 5, 7]
    assert resolve([BKID, BKID, 1], BKID) == [1]
    assert resolve([1, BKID], BKID) == []


@FAST
@given(traces)
def test_resolve_matches_reference(ids):
    assert resolve(ids, BKID) == reference_resolve(ids, BKID)


@FAST
@given(traces)
def test_roles_consistent_with_resolve(ids):
    r = roles(ids, BKID)
    assert len(r) == len(ids)
    assert [t for t, x in zip(ids, r) if x == FINAL] == resolve(ids, BKID)
    assert all((x == BK) == (t == BKID) for t, x in zip(ids, r))
    # each ERROR is undone by exactly one BK: errors = BKs that found something to delete
    effective = len([t for t in ids if t != BKID]) - len(resolve(ids, BKID))
    assert r.count(ERROR) == effective

# -----------------------------------------------------------------------------
# augmentations in id space


@FAST
@given(plain, st.integers(0, 4), st.booleans(), st.one_of(st.none(), st.integers(0, 6)), st.integers(0, 2 ** 16))
def test_inject_random_resolves(clean, n_errors, with_eot, cap, seed):
    eot = BKID + 1
    clean = clean + [eot] if with_eot else clean
    rng = random.Random(seed)
    for kw in (dict(vocab=range(0, BKID)), dict(), dict(error_len=(1, 4), vocab=[0, 1])):
        out = aug.inject_random(clean, BKID, rng, n_errors, eot_id=eot, max_backtracks=cap, **kw)
        assert resolve(out, BKID) == clean
        n_bk = out.count(BKID)
        assert cap is None or n_bk <= cap
        assert eot not in out[:-1] if with_eot else eot not in out
        assert n_bk <= n_errors * 4
        r = roles(out, BKID)
        assert r.count(ERROR) == n_bk  # every BK deletes an injected error, never a clean token


def test_inject_random_spans_and_errors():
    rng = random.Random(0)
    clean = list(range(20))
    out = aug.inject_random(clean, 99, rng, 3, error_len=2, vocab=[50], eot_id=None)
    assert out.count(99) == 6 and out.count(50) == 6 and resolve(out, 99) == clean
    # a sampler decides the error tokens; it may refuse a position (None)
    seen = []

    def sampler(c, i, rng):
        seen.append(i)
        return [77, 78] if i % 2 == 0 else None

    out = aug.inject_random(clean + [100], 99, rng, 2, sampler=sampler, eot_id=100)
    assert resolve(out, 99) == clean + [100] and out.count(99) == 4 and out[-1] == 100
    assert 20 not in seen  # never at the end-of-text position


@FAST
@given(plain, plain, st.one_of(st.none(), st.integers(0, 3)), st.one_of(st.none(), st.integers(0, 8)))
def test_lcs_trace_resolves(wrong, right, max_div, cap):
    out = aug.lcs_trace(wrong, right, BKID, max_divergences=max_div, max_backtracks=cap)
    assert resolve(out, BKID) == right
    assert cap is None or out.count(BKID) <= cap
    r = roles(out, BKID)
    assert r.count(ERROR) == out.count(BKID)


def test_lcs_trace_shape():
    # shared prefix, wrong path, as many BKs as wrong tokens, right path
    wrong, right = [1, 2, 3, 7, 8, 5], [1, 2, 3, 4, 5]
    out = aug.lcs_trace(wrong, right, BKID)
    assert out == [1, 2, 3, 7, 8, BKID, BKID, 4, 5]
    two = aug.lcs_trace([1, 6, 3, 7, 5], [1, 2, 3, 4, 5], BKID)
    assert two == [1, 6, BKID, 2, 3, 7, BKID, 4, 5]
    assert aug.lcs_trace([1, 6, 3, 7, 5], [1, 2, 3, 4, 5], BKID, max_divergences=1) == [1, 6, BKID, 2, 3, 4, 5]
    assert aug.lcs_trace(right, right, BKID) == right


def _banned_actions(trace, bk, policy, max_backtracks=None):
    """(action index, target) of every action whose target its own bans forbid: log-prob -inf under
    `rewind` for a retyped token (docs/backtrack-semantics.md §4), so train_sft refuses the trace."""
    L = data.layout(trace, bk, Rule(policy), max_backtracks=max_backtracks)
    return [(i, t) for i, (t, b) in enumerate(zip(L["tgt"], L["bans"])) if t in b]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=14), st.lists(st.integers(0, 3), max_size=14),
       st.one_of(st.none(), st.integers(0, 3)), st.one_of(st.none(), st.integers(0, 8)))
def test_lcs_trace_takes_no_banned_action(wrong, right, max_div, cap):
    # a 4-token alphabet makes a deleted token equal to the next right one common
    out = aug.lcs_trace(wrong, right, BKID, max_divergences=max_div, max_backtracks=cap)
    assert resolve(out, BKID) == right
    for policy in ("rewind", "keep"):
        assert _banned_actions(data.Trace([BKID - 1], out), BKID, policy, max_backtracks=cap) == [], (policy, out)


def test_lcs_trace_never_retypes_what_it_deleted():
    # difflib deletes [1, 5] and the right text goes on with 1: the shared 1 leaves the divergence
    # (it was written 1 5 BK BK 1 2: the 1 deleted at the first slot, then typed there again)
    assert aug.lcs_trace([1, 5, 1, 2], [1, 2], BKID) == [1, 5, BKID, 2]
    # two shared leading tokens; only the 5 is wrong
    assert aug.lcs_trace([1, 2, 5, 1, 2, 3], [1, 2, 3], BKID) == [1, 2, 5, BKID, 3]
    # the whole deleted span is right after all: nothing to undo
    assert aug.lcs_trace([1, 1, 0], [1, 0], BKID) == [1, 0]


@pytest.mark.parametrize("augment", ["lcs", "mixed"])
def test_lcs_traces_of_real_slips_take_no_banned_action(augment, byte_tok):
    # about 54 of 2,000 lcs traces (19 of 2,000 mixed) retyped a deleted token at its slot, so
    # `train_sft.py --augment=lcs --policy=rewind` stopped before its first step
    task = tasks.get_task("arith")
    problems = task.problems("train", n=2000, seed=0)
    tr = aug.build_traces(byte_tok, task, problems, random.Random(0), backtrack_ratio=1.0, augment=augment)
    _check_traces(byte_tok, task, problems, tr)
    for policy in ("rewind", "keep"):
        bad = [byte_tok.decode(t.response) for t in tr if _banned_actions(t, byte_tok.bk_id, policy)]
        assert bad == [], (policy, len(bad), bad[:2])


def _check_traces(tok, task, problems, traces):
    for t, p in zip(traces, problems):
        clean = tok.encode(p["solution"]) + [tok.eot_id]
        assert resolve(t.response, tok.bk_id) == clean
        assert tok.decode(resolve(t.response, tok.bk_id)) == p["solution"] + tokenizer.EOT_TEXT
        assert t.prompt == tok.encode(task.prompt(p))
        assert t.response[-1] == tok.eot_id and tok.eot_id not in t.response[:-1]


@pytest.mark.parametrize("tokname", ["byte", "gpt2"])
@pytest.mark.parametrize("augment", ["plausible", "random", "lcs", "mixed"])
def test_build_traces_resolve_after_tokenization(tokname, augment, byte_tok, gpt2_tok):
    tok = byte_tok if tokname == "byte" else gpt2_tok
    rng = random.Random(1)
    for name in ("arith", "countdown", "gsm8k"):
        task = tasks.get_task(name)
        problems = task.problems("train", n=12, seed=3)
        tr = aug.build_traces(tok, task, problems, rng, backtrack_ratio=0.75, max_backtracks=6, augment=augment)
        _check_traces(tok, task, problems, tr)
        with_bk = [t for t in tr if tok.bk_id in t.response]
        assert len(with_bk) == 9  # exactly the backtrack_ratio share
        assert all(t.meta["n_bk"] <= 6 for t in tr)
        assert all(t.meta["augment"] == "clean" for t in tr if tok.bk_id not in t.response)


def test_build_traces_caps(byte_tok):
    task = tasks.get_task("arith")
    problems = task.problems("train", n=20)
    tr = aug.build_traces(byte_tok, task, problems, random.Random(0), backtrack_ratio=1.0, max_backtracks=0)
    assert all(byte_tok.bk_id not in t.response for t in tr)
    tr = aug.build_traces(byte_tok, task, problems, random.Random(0), backtrack_ratio=1.0, max_backtracks=1,
                           n_errors=3, augment="mixed")
    assert all(t.response.count(byte_tok.bk_id) == 1 for t in tr)


def test_build_traces_uses_given_wrong_solutions(byte_tok):
    task = tasks.get_task("arith")
    p = dict(task.problems("train", n=1)[0])
    p["wrong"] = p["solution"].replace("=", "=1", 1)
    tr = aug.build_traces(byte_tok, task, [p], random.Random(0), backtrack_ratio=1.0, augment="lcs")
    assert tr[0].meta["augment"] == "lcs" and tr[0].response.count(byte_tok.bk_id) == 1
    assert byte_tok.decode(tr[0].response).count("=1" + tokenizer.BK_TEXT) == 1


def test_lcs_on_real_model_solutions(gpt2_tok):
    pairs = gsm8k.example_solution_pairs(EXAMPLES)
    assert len(pairs) > 3000
    bk = gpt2_tok.bk_id
    for q, wrong, right in pairs[:150]:
        assert right.split("\n")[-1].startswith("#### ") and "<<" not in right
        w, r = gpt2_tok.encode(wrong) + [gpt2_tok.eot_id], gpt2_tok.encode(right) + [gpt2_tok.eot_id]
        out = aug.lcs_trace(w, r, bk)
        assert resolve(out, bk) == r
        assert roles(out, bk).count(ERROR) == out.count(bk) > 0
        capped = aug.lcs_trace(w, r, bk, max_backtracks=10)
        assert resolve(capped, bk) == r and capped.count(bk) <= 10

# -----------------------------------------------------------------------------
# layouts


@FAST
@given(st.lists(st.integers(0, BKID - 1), min_size=1, max_size=5), traces, st.booleans())
def test_layout_counts_and_masks(prompt, response, train_prompt):
    t = data.Trace(prompt, response)
    r = roles(response, BKID)
    extra = len(prompt) - 1 if train_prompt else 0
    for policy in ("keep", "rewind"):
        for mask in (True, False):
            L = data.layout(t, BKID, Rule(policy), mask_errors=mask, train_prompt=train_prompt)
            assert len(L["tgt"]) == len(L["weight"]) == len(L["bans"]) == len(L["src"]) == len(response) + extra
            assert L["tgt"][extra:] == response
            w = L["weight"][extra:]
            if mask:
                assert [x == 0.0 for x in w] == [x == ERROR for x in r]
            else:
                assert all(x == 1.0 for x in w)
            n_nodes = len(prompt) + (len(response) if policy == "keep" else sum(1 for x in response if x != BKID))
            assert len(L["ids"]) == len(L["pos"]) == len(L["parent"]) in (n_nodes, n_nodes - 1)  # the last may go unfed
            assert all(0 <= s < len(L["ids"]) for s in L["src"])


def loop_ancestor_mask(parent):
    # the reference: one Python step per node, each row copied from its parent's
    import torch
    m = torch.zeros(len(parent), len(parent), dtype=torch.bool)
    for i, p in enumerate(parent):
        if p >= 0:
            m[i] = m[p]
        m[i, i] = True
    return m


def loop_collate(layouts, pad_id=0):
    # the reference: collate as it was, row by row and action by action
    import torch
    B, T = len(layouts), max(len(L["ids"]) for L in layouts)
    ids, pos = torch.full((B, T), pad_id, dtype=torch.long), torch.zeros((B, T), dtype=torch.long)
    chain = all(all(p == i - 1 for i, p in enumerate(L["parent"])) for L in layouts)
    mask = None if chain else torch.zeros(B, T, T, dtype=torch.bool)
    rows, srcs, tgts, ws, wrong, ban_a, ban_t = [], [], [], [], [], [], []
    for b, L in enumerate(layouts):
        n = len(L["ids"])
        ids[b, :n], pos[b, :n] = torch.tensor(L["ids"]), torch.tensor(L["pos"])
        if mask is not None:
            mask[b, :n, :n] = loop_ancestor_mask(L["parent"])
            mask[b, n:, 0] = True
        for s, t, w, bn, y in zip(L["src"], L["tgt"], L["weight"], L["bans"], L["wrong"]):
            a = len(rows)
            rows.append(b); srcs.append(s); tgts.append(t); ws.append(w); wrong.append(y)
            for x in bn:
                ban_a.append(a); ban_t.append(x)
    t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt)
    return dict(ids=ids, pos=pos, mask=mask, act_row=t(rows), act_src=t(srcs), tgt=t(tgts),
                weight=t(ws, torch.float32), wrong=t(wrong, torch.float32), ban_act=t(ban_a), ban_tok=t(ban_t),
                n_tokens=sum(len(L["ids"]) for L in layouts))


def test_ancestor_mask_equals_the_loop_on_random_trees():
    import torch
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 120)
        # parents precede children; several roots (-1) as in packed rows; deep chains and bushy trees
        deep = rng.random() < 0.5
        parent = [-1 if i == 0 or rng.random() < 0.03 else (i - 1 if deep and rng.random() < 0.9 else rng.randrange(i))
                  for i in range(n)]
        assert torch.equal(data.ancestor_mask(parent), loop_ancestor_mask(parent))


def test_collate_equals_the_loop():
    import torch
    rng = random.Random(1)
    for _ in range(40):
        traces = [data.Trace([rng.randrange(BKID) for _ in range(rng.randint(1, 6))],
                             [rng.choice([BKID] + list(range(BKID))) for _ in range(rng.randint(0, 40))])
                  for _ in range(rng.randint(1, 6))]
        policy = rng.choice(["keep", "rewind"])
        lays = [data.layout(t, BKID, Rule(policy), max_backtracks=rng.choice([None, 2])) for t in traces]
        if rng.random() < 0.3:
            lays = data.pack(lays, 64)
        got, want = vars(data.collate(lays)), loop_collate(lays)
        assert got.keys() == want.keys()
        for k, v in want.items():   # mask is None for chains, n_tokens an int
            if torch.is_tensor(v):
                assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
            else:
                assert got[k] == v, k

def test_prefetch_yields_in_order_and_raises_at_the_failing_step():
    import time
    made = []

    def make(step):
        time.sleep(0.002)
        made.append(step)
        if step == 6:
            raise SystemExit(f"bad data at step {step}")
        return step * step

    pf = data.Prefetch(make, range(3, 9), ahead=2)
    got = []
    with pytest.raises(SystemExit, match="step 6"):
        for x in pf:
            got.append(x)
    pf.close()
    assert got == [9, 16, 25] and made[:4] == [3, 4, 5, 6] and pf.waited >= 0

# -----------------------------------------------------------------------------
# answers and verifiers


@pytest.mark.parametrize("text,want", [
    ("so #### 18", "18"), ("#### 1,000", "1000"), ("#### $3.50", "3.5"), ("#### -0", "0"),
    ("#### 42.", "42"), ("#### +7", "7"), ("#### -12.0", "-12"), ("#### 0.50", "0.5"), ("#### .5", "0.5"),
    ("#### 007", "7"), ("#### -$5", "-5"), ("a #### 3\n#### 4", "4"), ("#### 5" + tokenizer.EOT_TEXT + "#### 6", "5"),
    ("#### 5\nmore", "5"), ("no answer", None), ("#### ", None), ("#### 18 dollars", None), ("####\n18", None),
    ("#### 1.2.3", None), (None, None),
])
def test_parse_answer(text, want):
    assert answers.parse_answer(text) == want


def test_arith_verifier_and_steps():
    task = tasks.get_task("arith")
    p = task.problem([3, 5, 2, 7], ["+", "-", "+"])
    assert p["question"] == "3+5-2+7" and p["answer"] == "13"
    assert p["solution"] == "3+5=8\n8-2=6\n6+7=13\n#### 13"
    assert task.verify(p["solution"], p) and task.verify(p["solution"] + tokenizer.EOT_TEXT, p)
    assert not task.verify("3+5=8\n8-2=6\n6+7=14\n#### 14", p)
    assert not task.verify("3+5=8\n8-2=6\n6+7=13", p)
    assert task.steps(p["solution"], p) == [True, True, True]
    assert task.steps("3+5=9\n9-2=7\n7+7=13\n#### 13", p) == [False, True, False]
    # one check per required step: the third step, never written, fails too (it used to be left
    # out, so skipping steps cost no process credit)
    assert task.steps("3+5=8\n8+2=10\n#### 10", p) == [True, False, False]  # wrong operation
    assert task.steps("3+5=8\nhmm\n#### 8", p) == [True, False, False]
    assert task.slip(p, random.Random(0)) != p["solution"]


def test_arith_splits_disjoint_and_deterministic():
    task = tasks.get_task("arith")
    tr, te = task.problems("train", n=3000), task.problems("test")
    assert {p["question"] for p in tr}.isdisjoint(p["question"] for p in te)
    assert len({p["question"] for p in te}) == len(te) == 500
    assert task.problems("test", n=50) == te[:50] and task.problems("train", n=5, seed=1) == task.problems("train", n=5, seed=1)
    for p in tr[:200]:
        assert task.verify(p["solution"], p) and all(task.steps(p["solution"], p))
    with pytest.raises(ValueError):
        aug.build_traces(tokenizer.Tokenizer("byte"), task, te[:3], random.Random(0))
    hard = tasks.get_task("arith", digits=2, steps=3, ops="+-*")
    for p in hard.problems("train", n=100):
        assert len(p["ops"]) == 3 and hard.verify(p["solution"], p) and 0 <= int(p["answer"]) <= 99


def test_countdown_verifier():
    task = tasks.get_task("countdown")
    p = dict(question="make 24 from 1 3 4 6", answer="24", nums=[1, 3, 4, 6], target=24)
    good = "3/4=(3/4)\n1-(3/4)=(1/4)\n6/(1/4)=24\n#### 24"  # exact rationals
    assert task.verify(good, p) and task.steps(good, p) == [True, True, True]
    assert task.verify("6*4=24\n#### 24", p)  # any valid solution, not all numbers needed
    assert task.verify("4*6=24\n3-1=2\n24/2=12\n12*2=24\n#### 24", p) is False  # 2 used twice
    assert not task.verify("6*4=24\n24*1=24\n24*1=24\n#### 24", p)  # 1 used twice
    assert not task.verify("6*6=36\n36-12=24\n#### 24", p)  # numbers not given
    assert not task.verify("6*4=25\n#### 24", p)  # wrong arithmetic
    assert not task.verify("6*4=24\n#### 25", p)  # wrong answer
    assert not task.verify("6+4=10\n#### 24", p)  # last value is not the target
    assert not task.verify("6*4=24\n#### 24\n6+1=7", p)  # junk after the answer
    assert not task.verify("6*4=24\nso\n#### 24", p)
    assert task.steps("6*4=24\n6+1=7\n#### 7", p) == [True, False]
    for q in task.problems("train", n=100) + task.problems("test", n=50):
        assert task.verify(q["solution"], q) and all(task.steps(q["solution"], q))
        assert q["target"] not in q["nums"]
    four = tasks.get_task("countdown", n_numbers=4)
    assert all(len(q["nums"]) == 4 and four.verify(q["solution"], q) for q in four.problems("train", n=50))
    assert {q["question"] for q in task.problems("train", n=500)}.isdisjoint(q["question"] for q in task.problems("test"))


def test_gsm8k_verifier_and_steps():
    for calc in ("strip", "annotated"):
        task = tasks.get_task("gsm8k", calc=calc)
        ps = task.problems("test")
        assert len(ps) == 1319
        p = ps[0]
        assert p["answer"] == "18" and p["solution"].endswith("\n#### 18")
        assert ("<<" in p["solution"]) == (calc == "annotated")
        assert task.verify(p["solution"], p) and not task.verify(p["solution"].replace("#### 18", "#### 19"), p)
        assert task.steps(p["solution"], p) == [True, True]
        assert task.prompt(p).startswith("Question: Janet")
    task = tasks.get_task("gsm8k")
    assert task.steps("She has 16 - 3 - 4 = 10 eggs and makes 9 * 2 = $18.\n#### 18", p) == [False, True]
    assert task.steps("<<16-3-4=9>>9 and <<9*2=19>>19\n#### 19", p) == [True, False]
    assert task.steps("about 10 / 3 = 3.33 each, 25% * 80 = 20", p) == [True, True]
    assert task.steps("no arithmetic here\n#### 18", p) == []
    assert tasks.get_task("gsm8k").problems("train", n=5, seed=2) == tasks.get_task("gsm8k").problems("train", n=5, seed=2)


def _write(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    good = json.dumps(dict(question="What is 1+1?", answer="1+1=2\n#### 2"))
    bad = str(tmp_path / "train.jsonl")
    _write(bad, [good, good, "{not json"])
    with pytest.raises(ValueError, match=r"train\.jsonl:3: malformed"):
        tasks.get_task("gsm8k", data_dir=str(tmp_path)).problems("train")
    _write(bad, [good, json.dumps(dict(question="q"))])
    with pytest.raises(ValueError, match=r"train\.jsonl:2: missing .*'answer'"):
        tasks.get_task("gsm8k", path=bad).problems("train")
    _write(bad, [json.dumps(dict(question="q", answer="no final line"))])
    with pytest.raises(ValueError, match=r"train\.jsonl:1: "):
        tasks.get_task("gsm8k", path=bad).problems("train")


def test_gsm8k_train_never_holds_test_questions(tmp_path):
    real = tasks.get_task("gsm8k")
    train = real.problems("train")
    test_q = {gsm8k.normalize_question(p["question"]) for p in real.problems("test")}
    assert not any(gsm8k.normalize_question(p["question"]) in test_q for p in train)
    # a leaked test question (with different spacing and case) is dropped from the training split
    rows = [r for _, r in read_jsonl(os.path.join(GSM8K_DIR, "test.jsonl.gz"))][:3]
    leak = dict(rows[1], question="  " + rows[1]["question"].upper().replace(" ", "  "))
    _write(str(tmp_path / "test.jsonl"), [json.dumps(r) for r in rows])
    _write(str(tmp_path / "train.jsonl"), [json.dumps(dict(question="What is 2+2?", answer="2+2=4\n#### 4")),
                                           json.dumps(leak)])
    task = tasks.get_task("gsm8k", data_dir=str(tmp_path))
    ps = task.problems("train")
    assert [p["answer"] for p in ps] == ["4"] and task.dropped == 1
    # and building training traces from test problems refuses
    with pytest.raises(ValueError, match="test problem"):
        aug.build_traces(tokenizer.Tokenizer("byte"), task, task.problems("test")[:1], random.Random(0))
    aug.build_traces(tokenizer.Tokenizer("byte"), task, ps, random.Random(0))

# -----------------------------------------------------------------------------
# curriculum


def test_curriculum():
    c = schedules.Curriculum.from_string("0:2,0.3:5,0.6:10")
    assert [c.max_backtracks(x) for x in (0, 0.29, 0.3, 0.59, 0.6, 1.0)] == [2, 2, 5, 5, 10, 10]
    assert str(c) == "0:2,0.3:5,0.6:10" and schedules.Curriculum.from_string(str(c)) == c
    assert schedules.Curriculum().max_backtracks(0.5) == 5
    assert schedules.Curriculum.from_string("0:0,0.5:none").max_backtracks(0.7) is None
    for bad in ("0.1:2", "0:2,x", "0:-1"):
        with pytest.raises(ValueError):
            schedules.Curriculum.from_string(bad)
