"""First errors located by rollouts (self_errors.py --locate=rollouts, OmegaPRM's binary search) on
scripted continuations, the self-error traces made from them, and the verifier head as a process
reward model (reward.step_wrong_probs, reward.prm_process_score, train_grpo.py --prm)."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from data import Rule, resolve
from decode import replay
from reward import prm_process_score, step_bounds, step_ends, step_wrong_probs
from self_errors import checker_first_error, locate_first_errors, located_candidate, solves, unsearchable
from tasks import get_task
from test_verifier import tiny
from tokenizer import get_tokenizer

TOK = get_tokenizer("byte")
ARITH = get_task("arith")
P = ARITH.problem([7, 5, 6, 3, 2], ["+", "+", "+", "+"])   # 7+5=12 / 12+6=18 / 18+3=21 / 21+2=23 / #### 23
RULE = Rule()


def ids(text, end=True):
    return TOK.encode(text) + ([TOK.eot_id] if end else [])


def planted(first):
    """A wrong completion of P whose first wrong step is `first` (1-based; 5 is the answer line):
    the steps before it are the reference's, step `first` is one too high, later steps carry on
    from the wrong value."""
    acc, lines = 7, []
    for i, x in enumerate([5, 6, 3, 2], 1):
        new = acc + x + (i == first)
        lines.append(f"{acc}+{x}={new}")
        acc = new
    return ids("\n".join(lines + [f"#### {acc + (first == 5)}"]))


def scripted(win_rate=1.0, rng=None):
    """A stand-in for the model's sampler: from a prefix that is still the reference's, it writes the
    rest of the reference (with probability win_rate); from any other prefix, or when it misses, it
    writes one wrong last line. generate-like outputs, each with its raw response."""
    ref = ids(P["solution"])
    prompt_len = len(TOK.encode(P["question"] + "\n"))

    def sample(prompts):
        outs = []
        for q in prompts:
            prefix = q[prompt_len:]
            good = prefix == ref[:len(prefix)] and (rng is None or rng.random() < win_rate)
            cont = ref[len(prefix):] if good else ids("#### 0")
            outs.append(dict(response=cont, resolved=cont))
        return outs
    return sample


def search_of(resolved):
    return dict(p=P, prompt=TOK.encode(P["question"] + "\n"), resolved=resolved, bounds=step_bounds(TOK, resolved))


def wins(s, got):
    return solves(TOK, ARITH, s["p"], got)


@pytest.mark.parametrize("first", [1, 2, 3, 4, 5])
def test_rollout_search_finds_the_planted_first_error(first):
    """On continuations that succeed exactly from the prefixes before the planted error, the binary
    search lands on it in 1 + ceil(log2 M) checks, agrees with the task's step checker, and the
    trace it makes resolves to a verified solution."""
    wrong = planted(first)
    assert not ARITH.verify(TOK.decode(wrong[:-1]), P)
    s = search_of(wrong)
    M = len(s["bounds"]) - 1
    assert M == 5
    locate_first_errors([s], scripted(), wins, rollouts=3)
    assert s["end"] == "located" and s["first"] == first
    assert s["checks"] <= 1 + math.ceil(math.log2(M))
    assert checker_first_error(TOK, ARITH, P, wrong, s["bounds"]) == first
    assert all(v == (1.0 if k < first else 0.0) for k, v in s["values"].items())
    c, why = located_candidate(TOK, s, max_error=32)
    assert why is None and resolve(c["response"], TOK.bk_id) == ids(P["solution"])
    assert solves(TOK, ARITH, P, resolve(c["response"], TOK.bk_id))
    # only the wrong step's tail that the winning continuation does not share is deleted: the first
    # deleted token differs from the token written in its place (slot bans would forbid it)
    k = c["n_err"]
    deleted, rewritten = c["prefix"][-k], c["correction"][0]
    assert deleted != rewritten and c["prefix"][:-k] == ids(P["solution"])[:len(c["prefix"]) - k]
    assert c["response"][len(c["prefix"]):len(c["prefix"]) + k] == [TOK.bk_id] * k


def test_missed_rollouts_only_move_the_error_earlier():
    """With continuations that succeed from a good prefix only some of the time, a search may place
    the error too early (a good prefix whose rollouts all missed), never later: a prefix that holds
    the error never wins. More rollouts per check place it right more often."""
    rng = random.Random(0)
    hits = {1: 0, 8: 0}
    for trial in range(60):
        first = rng.randint(1, 5)
        for R in hits:
            s = search_of(planted(first))
            locate_first_errors([s], scripted(0.3, rng), wins, rollouts=R)
            if s["end"] == "located":
                assert s["first"] <= first
                hits[R] += s["first"] == first
            else:
                assert s["end"] == "unsolved"
    assert hits[8] > hits[1]


def test_unsolved_and_over_budget_and_many_at_once():
    """A problem no rollout solves is dropped; a token budget stops a search; searches of different
    lengths advance together, one sampler call per round."""
    s = search_of(planted(3))
    locate_first_errors([s], lambda qs: [dict(response=ids("#### 0"), resolved=ids("#### 0")) for _ in qs], wins, 2)
    assert s["end"] == "unsolved" and s["checks"] == 1
    s = search_of(planted(3))
    locate_first_errors([s], scripted(), wins, rollouts=2, budget=1)
    assert s["end"] == "over_budget" and s["checks"] == 1
    calls = []
    sample = scripted()
    many = [search_of(planted(f)) for f in (1, 2, 3, 4, 5)] + [search_of(ids("7+5=13\n#### 13"))]
    locate_first_errors(many, lambda qs: calls.append(len(qs)) or sample(qs), wins, rollouts=2)
    assert [s["first"] for s in many] == [1, 2, 3, 4, 5, 1]
    assert len(calls) == 1 + math.ceil(math.log2(5)) and calls[0] == 2 * len(many)


def test_only_completions_known_to_hold_a_wrong_step_are_searched():
    """The search takes a whole completion to be wrong: one that stops before its answer line may
    have only right steps (it would get a 'first error' all the same), and a cut-off one is not
    known to be wrong. On GSM8K, whose prose lines hold no checked step, there is no checker truth."""
    assert unsearchable(TOK, ARITH, planted(3)) is None
    assert unsearchable(TOK, ARITH, ids("7+5=12\n12+6=18\n")) == "no_answer"
    assert unsearchable(TOK, ARITH, ids("7+5=12\n12+6", end=False)) == "cut_off"
    assert unsearchable(TOK, ARITH, [TOK.eot_id]) == "ended_early"
    gsm = get_task("gsm8k")
    q = gsm.problems("train", n=1)[0]
    r = ids("First find the total.\n3+4=7\n#### 8")
    assert checker_first_error(TOK, gsm, q, r, step_bounds(TOK, r)) is None


def test_step_ends():
    """Steps end past each newline and at the final stop token; a truncated line is not scored."""
    r = ids("ab\ncd\n#### 3")
    assert step_ends(TOK, r) == [3, 6, len(r) - 1]
    r = ids("ab\ncd\n")                       # the answer line's newline, then end-of-text
    assert step_ends(TOK, r) == [3, 6]
    assert step_ends(TOK, ids("ab\ncd", end=False)) == [3]
    assert step_ends(TOK, [TOK.eot_id]) == []


@pytest.mark.parametrize("policy", ["keep", "rewind"])
def test_step_probs_are_the_decoders_head_at_step_ends_one_row_and_many(policy):
    """step_wrong_probs, one teacher-forced forward over many rows, gives the head's probability
    that decoding the same tokens one at a time reports at each step end, for one row and many."""
    model = tiny()
    rng = random.Random(1)
    rows = []
    for _ in range(5):
        text = "\n".join("".join(rng.choice("0123456789+=") for _ in range(rng.randint(1, 6)))
                         for _ in range(rng.randint(1, 4)))
        rows.append((TOK.encode(rng.choice(["1+2\n", "7-3+1\n", "9\n"])), ids(text, end=rng.random() < 0.7)))
    prompts, resolved = [q for q, _ in rows], [r for _, r in rows]
    rule = Rule(policy)
    many = step_wrong_probs(model, TOK, prompts, resolved, rule, batch_size=3)
    for (q, r), got in zip(rows, many):
        one = step_wrong_probs(model, TOK, [q], [r], rule)[0]
        dec = replay(model, [q], [r], Rule(policy), return_verifier=True)[0]["verifier"]
        want = [dec[e] for e in step_ends(TOK, r)]
        assert len(got) == len(want) == len(one)
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-5)
        assert torch.allclose(torch.tensor(one), torch.tensor(got), atol=1e-5)


def test_prm_score_only_falls_as_steps_are_added():
    """The clip form: all steps passed -> 1; appending a step never raises the score (padding with
    easy steps cannot pay); a flagged step costs in proportion; the score stays in [0, 1]."""
    rng = random.Random(0)
    assert prm_process_score([]) == 1.0 and prm_process_score([0.1, 0.5, 0.3]) == 1.0
    assert prm_process_score([0.75]) == pytest.approx(0.5) and prm_process_score([1.0, 1.0]) == 0.0
    for _ in range(500):
        probs = [rng.random() for _ in range(rng.randint(0, 8))]
        t = rng.choice([0.0, 0.3, 0.5, 0.9])
        a = prm_process_score(probs, t)
        assert 0.0 <= a <= 1.0
        assert prm_process_score(probs + [rng.random()], t) <= a


def test_rollouts_and_prm_command_lines(tmp_path):
    """self_errors.py --locate=rollouts writes traces, pairs, process labels and its search stats;
    train_grpo.py --prm scores the process component with a frozen head; a PRM without a head,
    an unknown --locate and a bad --prm_threshold each give one line and a non-zero exit."""
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, capture_output=True, text=True, timeout=300)
    tiny_args = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=128", "--n_train=200", "--eval_interval=0",
                 "--progress=False", "--lr=3e-3", "--max_iters=20", "--batch_size=16"]
    head, plain = str(tmp_path / "head"), str(tmp_path / "plain")
    for out, extra in ((head, ["--verifier_weight=1.0"]), (plain, ["--max_iters=1"])):
        p = run("train_sft.py", f"--out_dir={out}", *tiny_args, *extra)
        assert p.returncode == 0, p.stderr
    traces = str(tmp_path / "loc_traces.jsonl")
    p = run("self_errors.py", f"--ckpt={head}", "--n=6", "--samples=2", "--locate=rollouts", "--rollouts=2",
            "--max_new_tokens=24", f"--out={traces}", "--filter=False")
    assert p.returncode == 0, p.stderr
    stats = json.load(open(str(tmp_path / "loc_traces.stats.json")))
    # every wrong sample is searched or dropped for a reason, every search ends one way (a tiny model
    # rarely finishes, so there may be nothing to search: the scripted tests above do the searching)
    assert stats["wrong"] == stats["searched"] + sum(stats.get(k, 0) for k in ("ended_early", "cut_off", "no_answer",
                                                                              "duplicate_sample"))
    assert stats["searched"] == sum(stats.get(k, 0) for k in ("located", "unsolved", "over_budget"))
    assert {"head_flags_wrong_steps", "head_p_right_steps"} <= set(stats)   # its head read as a PRM, vs the checker
    assert os.path.exists(str(tmp_path / "loc_labels.jsonl")) and os.path.exists(str(tmp_path / "loc_pairs.jsonl"))
    for line in open(str(tmp_path / "loc_labels.jsonl")):
        row = json.loads(line)
        assert 1 <= row["first_error"] <= len(row["step_ends"])
    grpo = str(tmp_path / "grpo")
    p = run("train_grpo.py", f"--init_from={head}", f"--out_dir={grpo}", f"--prm={head}", "--max_iters=1",
            "--prompts_per_step=2", "--group_size=2", "--max_new_tokens=16", "--eval_interval=0", "--progress=False")
    assert p.returncode == 0, p.stderr
    m = [json.loads(line) for line in open(os.path.join(grpo, "metrics.jsonl")) if '"reward/process_mean"' in line]
    # the process component is the PRM's, not the step checks' (an untrained head passes most steps)
    assert m and 0.0 <= m[0]["reward/process_mean"] <= 1.0 and m[0]["reward/process_mean"] != m[0]["process_rule"]
    for args, needle in (([f"train_grpo.py", f"--init_from={head}", f"--out_dir={grpo}2", f"--prm={plain}"], "verifier head"),
                         ([f"train_grpo.py", f"--init_from={head}", f"--out_dir={grpo}3", f"--prm={head}",
                           "--prm_threshold=1"], "--prm_threshold"),
                         ([f"self_errors.py", f"--ckpt={head}", "--locate=somewhere", f"--out={traces}"], "--locate")):
        p = run(*args)
        assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr, p.stderr
