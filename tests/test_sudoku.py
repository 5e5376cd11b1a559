"""The sudoku task (tasks/sudoku.py) and its depth-first search traces: the verifier is exact, every
trace resolves to the solution and takes no banned action under either policy, and greedy `rewind`
decoding of a model with a fixed order of preference is exactly the depth-first search."""
import random

import pytest
import torch
from torch import nn

from augment import build_traces
from data import ERROR, Rule, layout, resolve, roles
from decode import generate
from model import GPTConfig
from tasks import get_task
from tokenizer import Tokenizer

TOK = Tokenizer("byte")
TASK = get_task("sudoku")


def problems(n=40, split="train", **kw):
    return get_task("sudoku", **kw).problems(split, n=n, seed=3)


def test_problems_unique_with_guess_points_and_disjoint_splits():
    train, test = problems(60), problems(30, "test")
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    for p in train + test:
        assert TASK.count_solutions(list(p["grid"]), limit=3) == 1
        assert TASK.guess_points(p["grid"], p["cells"])
        assert 14 <= p["grid"].count(0) <= 18
        assert TASK.verify(p["solution"], p) and TASK.answer_of(p["solution"]) == p["answer"]
        assert TASK.problem(p["question"].removeprefix("sudoku "))["cells"] == p["cells"]   # solving it again


@pytest.mark.parametrize("seed", range(20))
def test_verifier_accepts_every_valid_grid_and_rejects_each_single_cell_violation(seed):
    rng = random.Random(seed)
    full = TASK._full_grid(rng)
    grid = [0 if rng.random() < 0.5 else v for v in full]
    p = TASK.problem(TASK.format_grid(grid, "/"), full)
    text = TASK.format_grid(full, "\n")
    assert TASK.verify(text, p) and all(TASK.steps(text, p))
    # a valid grid other than the solution is accepted too (relabel the digits: still a sudoku;
    # the problem's givens are relabelled with it)
    perm = list(range(1, 7))
    rng.shuffle(perm)
    other = [perm[v - 1] for v in full]
    q = TASK.problem(TASK.format_grid([perm[v - 1] if v else 0 for v in grid], "/"), other)
    assert TASK.verify(TASK.format_grid(other, "\n"), q)
    for i in range(36):
        for v in range(1, 7):
            if v != full[i]:
                bad = list(full)
                bad[i] = v
                assert not TASK.verify(TASK.format_grid(bad, "\n"), p), (i, v)
    assert not TASK.verify(text[:-1], p) and not TASK.verify(text + "\n1", p)   # a cell short, a cell over


@pytest.mark.parametrize("policy", ["keep", "rewind"])
def test_search_traces_resolve_and_take_no_banned_action(policy):
    ps = problems(80)
    traces = build_traces(TOK, TASK, ps, random.Random(0), backtrack_ratio=1.0, max_backtracks=None, augment="dfs")
    searched = 0
    for t, p in zip(traces, ps):
        assert resolve(t.response, TOK.bk_id) == TOK.encode(p["solution"]) + [TOK.eot_id]
        searched += TOK.bk_id in t.response
        L = layout(t, TOK.bk_id, Rule(policy), mask_errors=True)
        assert all(tgt not in ban for tgt, ban in zip(L["tgt"], L["bans"]))
        if policy == "rewind":   # errors leave the context: every node's position is its cell's
            final = [i for i, r in enumerate(roles(t.response, TOK.bk_id)) if r != ERROR and t.response[i] != TOK.bk_id]
            assert len(final) == 42   # 36 cells, 5 newlines, end-of-text
    assert searched > len(ps) // 2   # most traces of this split search


def test_cascade_pops_through_givens_to_the_previous_blank():
    rng = random.Random(1)
    for p in problems(60):
        acts = TASK.search_trace(p, rng)
        assert resolve(acts, None) == list(p["solution"])   # None is the BK of a trace in characters
        # after every run of BKs the next action writes a value at a blank cell, never a given
        items = [i for i, v in enumerate(p["grid"])]
        for j in range(1, len(acts)):
            if acts[j - 1] is None and acts[j] is not None:
                cell = len([a for a in resolve(acts[:j], None) if a != "\n"])
                assert p["grid"][cell] == 0, "a pop stopped at a given"


class Preference(nn.Module):
    """A stand-in model with a fixed order of preference: at a blank cell the values its filled peers
    allow, in the order pref(cell) ranks them, then (bk_logit) BK, then (bad_logit) the values they
    forbid (BK first where they allow none); at a given or a newline, that character, then BK; after the grid, end-of-text. It reads its
    context from the cache's slots (the rewound response is exactly the slots, docs/backtrack-semantics.md §3)."""

    def __init__(self, p, pref, bk_logit=5.0, bad_logit=0.0):
        super().__init__()
        self.config = GPTConfig(n_layer=1, n_head=1, n_embd=320, vocab_size=320, block_size=512)
        self.lm_head = nn.Linear(320, 320, bias=False)
        self.lm_head.weight.data = torch.eye(320)
        self.p, self.pref, self.bk_logit, self.bad_logit = p, pref, bk_logit, bad_logit
        self.slots = {}

    def hidden(self, idx, pos=None, mask=None, cache=None, weights=None):
        B, T = idx.shape
        pos = torch.arange(T).expand(B, T) if pos is None else pos
        for t in range(T):
            self.slots[int(pos[0, t])] = int(idx[0, t])
            written = [self.slots[j] for j in range(int(pos[0, t]) + 1)][self.plen:]
            cache.h_of_slot[0, int(pos[0, t])] = self.logits(written)
        return None

    def logits(self, written):
        z = torch.full((320,), -20.0)
        text = TOK.decode(written)
        cells = text.replace("\n", "")
        if len(text) == 41:
            z[TOK.eot_id] = 10.0
            return z
        z[TOK.bk_id] = self.bk_logit
        if len(text) % 7 == 6:   # the newline after a row
            z[ord("\n")] = 10.0
            return z
        cell = len(cells)
        if self.p["grid"][cell]:
            z[ord(str(self.p["grid"][cell]))] = 10.0
            return z
        grid = [int(c) for c in cells] + [0] * (36 - len(cells))
        grid = [g or v for g, v in zip(grid, self.p["grid"])]
        grid[cell] = 0
        ok = TASK.allowed(grid, cell)
        if not ok:   # a dead end in plain sight: BK first
            z[TOK.bk_id] = 10.0
        for v in range(1, 7):
            z[ord(str(v))] = self.bad_logit
        for rank, v in enumerate(self.pref(cell, ok)):
            z[ord(str(v))] = 10.0 - 0.5 * rank
        return z


def preference(seed):
    orders = {c: random.Random(seed * 100 + c).sample(range(1, 7), 6) for c in range(36)}
    return lambda cell, values: sorted(values, key=orders[cell].index)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_rewind_decoding_is_the_depth_first_search(seed):
    p = problems(6, "test")[seed]
    pref = preference(seed)
    want = [TOK.bk_id if a is None else ord(a) for a in TASK.search_trace(p, None, prefer=pref)] + [TOK.eot_id]
    prompt = TOK.encode(TASK.prompt(p))
    model = Preference(p, pref)
    model.plen = len(prompt)
    out = generate(model, [prompt], max_new_tokens=len(want) + 10, rule=Rule("rewind"), temperature=0.0)[0]
    assert out["response"] == want


def test_pop_below_finishes_the_search_where_bk_ranks_below_forbidden_values():
    """Where BK ranks below the forbidden values (though above them at a cell that allows none),
    plain greedy writes a forbidden value once a cell's allowed values are all banned; pop_below
    gives the search its way out, and it is the depth-first search again."""
    differs = 0
    for seed in range(8):
        p = problems(8, "test")[seed]
        pref = preference(seed)
        want = [TOK.bk_id if a is None else ord(a) for a in TASK.search_trace(p, None, prefer=pref)] + [TOK.eot_id]
        prompt = TOK.encode(TASK.prompt(p))
        outs = []
        for pop_below in (0.0, 0.05):
            model = Preference(p, pref, bk_logit=-5.0, bad_logit=4.0)
            model.plen = len(prompt)
            outs.append(generate(model, [prompt], max_new_tokens=len(want) + 10, rule=Rule("rewind"), temperature=0.0,
                                 pop_below=pop_below)[0]["response"])
        assert outs[1] == want
        differs += outs[0] != want
    assert differs > 0   # some search exhausts a cell that allowed values


def test_allowed_next_is_the_rule_check():
    """allowed_next along the solution always allows the solution's next character, and at a blank
    cell exactly the values that keep the grid valid so far."""
    for p in problems(10):
        sol = p["solution"]
        for i in range(len(sol) + 1):
            ok = TASK.allowed_next(p, sol[:i])
            assert (sol[i] if i < len(sol) else "") in ok
        grid = p["grid"]
        cell = grid.index(0)
        text = TASK.format_grid(p["cells"], "\n")[:cell + cell // 6]
        filled = [int(c) for c in text.replace("\n", "")] + grid[cell:]
        want = [str(v) for v in range(1, 7)
                if all(filled[j] != v for j in TASK.peers[cell])]
        assert TASK.allowed_next(p, text) == want


def test_oracle_search_solves_with_any_proposer():
    """The rule-checked search is complete: with an untrained model proposing, it solves every
    puzzle, writes only what the checker allows, and counts a BK for each undo."""
    from evaluate import oracle_search
    from model import GPT
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=128))
    ps = problems(5, "test")
    m, records = oracle_search(model, TOK, TASK, ps, max_new_tokens=2000)
    assert m["acc"] == 1.0 and m["finished"] == 1.0
    for r, p in zip(records, ps):
        assert resolve(r["response"], TOK.bk_id) == TOK.encode(p["solution"]) + [TOK.eot_id]
        assert r["backtracks"] == r["response"].count(TOK.bk_id)
