"""GRPO and its rewards: invariant 4 through the rollout path, rewards that cannot be gamed by
backtracking, the cap, advantages / loss normalisers / clipping against hand-computed values,
the curricula at their phase boundaries, and short runs of train_grpo.main (resume included)."""
import json
import math
import os

import pytest
import torch

import train_grpo
from conftest import only_bk_rows_moved
from data import Rule
from hf import padded_vocab
from model import GPT, GPTConfig
from tasks import get_task
from tokenizer import get_tokenizer
from reward import RewardConfig, draft_ids, score, total
from schedules import WeightSchedule, budget_at
from train_grpo import (Config, clipped_objective, group_advantages, kl_k3, recompute_batches, rollout,
                        rollout_logprobs, sequence_weights)

TOK = get_tokenizer("byte")
BK, EOT = TOK.bk_id, TOK.eot_id
TASK = get_task("arith")
PROBLEM = TASK.problem([7, 5, 3, 9], ["+", "-", "+"])   # 7+5=12 / 12-3=9 / 9+9=18 / #### 18


def ids(text):
    return TOK.encode(text)


def tiny(seed=0, bk_pull=0.0):
    """A random byte-level GPT; bk_pull steers its final hidden state towards BK."""
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=96, vocab_size=padded_vocab(TOK.n_vocab), n_vocab=TOK.n_vocab, eot_id=EOT, bk_id=BK,
                    n_layer=2, n_head=2, n_embd=32)
    m = GPT(cfg).eval()
    if bk_pull:
        with torch.no_grad():
            u = torch.nn.functional.normalize(torch.randn(32), dim=0)
            m.transformer.ln_f.bias.copy_(u)
            m.transformer.wte.weight[BK] = bk_pull * u
    return m

# -----------------------------------------------------------------------------
# invariant 4, end to end through the code path the trainer runs


@pytest.mark.parametrize("policy", ["keep", "rewind"])
@pytest.mark.parametrize("T,k,p", [(1.0, 0, 1.0), (0.7, 20, 0.9), (1.3, 0, 0.8)])
def test_rollout_logprobs_equal_recompute(policy, T, k, p):
    m = tiny(bk_pull=2.5)
    cfg = Config(group_size=3, temperature=T, top_k=k, top_p=p, max_new_tokens=24, max_backtracks=3, micro_batch=4)
    problems = TASK.problems("train", n=3, seed=0)
    w = WeightSchedule.from_string("constant").at(0.0)
    rows = rollout(m, TOK, TASK, problems, cfg, Rule(policy), seed=1, budget=2, weights=w, rc=RewardConfig())
    n_bk = [r["n_bk"] for r in rows]
    assert len(rows) == 9 and sum(n_bk) > 0 and max(n_bk) <= 3   # backtracks happen, the cap holds
    for s0, batch in recompute_batches(rows, TOK, Rule(policy), cfg, "cpu"):  # two micro-batches: 4 + 4 + 1 rows
        with torch.no_grad():
            lp = rollout_logprobs(m, batch, cfg)
        rec = torch.tensor([x for r in rows[s0:s0 + cfg.micro_batch] for x in r["logprobs"]])
        assert torch.isfinite(lp).all() and lp.shape == rec.shape
        assert (lp - rec).abs().max().item() < 1e-5

# -----------------------------------------------------------------------------
# rewards


CORRECT = "7+5=12\n12-3=9\n9+9=18\n#### 18"
WRONG = "7+5=13\n13-3=10\n10+9=19\n#### 19"   # a slip in step 1, carried on


def trace(*parts):
    """Text pieces and BK markers ('<'), e.g. trace('7+5=13', '<', '2\\n...')."""
    out = []
    for x in parts:
        out += [BK] if x == "<" else ids(x)
    return out


def all_weights():
    ws = [WeightSchedule.from_string(s).at(t) for s in ("constant", "notes") for t in (0.0, 0.4, 0.9)]
    return ws


def totals(response, budget=4):
    c = score(TASK, TOK, PROBLEM, response, budget=budget)
    return c, [total(c, w) for w in all_weights()]


def test_correct_answer_components():
    c, _ = totals(ids(CORRECT) + [EOT])
    assert (c["outcome"], c["process"], c["format"], c["backtrack"]) == (1.0, 1.0, 1.0, 1.0)
    c, _ = totals(ids(WRONG) + [EOT])
    # steps 2 and 3 carry the wrong total on correctly: process gives them credit, the outcome does not
    assert c["outcome"] == 0.0 and c["process"] == pytest.approx(2 / 3) and c["format"] == 1.0
    assert c["backtrack"] == 0.0
    c, _ = totals(ids(CORRECT))                      # truncated before end-of-text
    assert c["outcome"] == 1.0 and c["format"] == 0.5


def test_resolved_text_is_scored_not_the_raw_one():
    fixed = trace("7+5=13", "<", "2\n12-3=9\n9+9=18\n#### 18") + [EOT]
    c, _ = totals(fixed)
    assert c["outcome"] == 1.0 and c["process"] == 1.0 and c["right"] and not c["draft_right"]
    assert c["backtrack"] == pytest.approx(0.5)      # correction_bonus / sqrt(1)
    two = trace("7+5=13", "<", "<", "12\n12-3=9\n9+9=18\n#### 18") + [EOT]
    assert totals(two)[0]["backtrack"] == pytest.approx(0.5 / math.sqrt(2))


def test_draft_definition():
    # the first draft, continued by the final text from its length on
    r = trace("ab", "<", "c", "de")
    assert draft_ids(r, BK) == ids("abde")
    assert draft_ids(trace("abc", "<", "<", "<"), BK) == ids("abc")     # everything deleted: the draft is what was written
    assert draft_ids(trace("abc"), BK) == ids("abc")


def test_backtracking_cannot_beat_a_clean_correct_answer():
    correct = totals(ids(CORRECT) + [EOT])[1]
    lines = CORRECT.split("\n")
    policies = {
        # always backtracks: garbage + BK after every line, the answer itself right
        "always_garbage": trace(*[x for l in lines for x in (l, "x", "<", "\n")][:-1]) + [EOT],
        # always backtracks: deletes each line's last token and writes it again (a no-op under `keep`)
        "always_rewrite": trace(*[x for l in lines for x in (l, "<", l[-1], "\n")][:-1]) + [EOT],
        # a deliberate slip, fixed at once
        "slip_and_fix": trace("7+5=13", "<", "2\n12-3=9\n9+9=18\n#### 18") + [EOT],
        # never backtracks although the draft is wrong
        "never": ids(WRONG) + [EOT],
        # writes the right answer, then deletes all of it
        "delete_all": ids(CORRECT) + [BK] * len(ids(CORRECT)) + [EOT],
        "delete_all_uncapped": None,
        # the wrong answer, a backtrack that changes nothing useful
        "failed_fix": trace("7+5=13", "<", "4\n14-3=11\n11+9=20\n#### 20") + [EOT],
        "empty": [EOT],
    }
    for name, resp in policies.items():
        if name == "delete_all_uncapped":
            resp, budget = policies["delete_all"], None
        else:
            budget = 4
        got = totals(resp, budget)[1]
        for a, b in zip(got, correct):
            assert a < b, (name, got, correct)
    # and a correction still beats leaving the slip in, and beats a failed correction
    fix, never, failed = (totals(policies[n])[1] for n in ("slip_and_fix", "never", "failed_fix"))
    assert all(f > n for f, n in zip(fix, never)) and all(f > x for f, x in zip(fix, failed))


def test_unnecessary_backtrack_is_penalised():
    # a right token deleted and written again: the draft is the final text, already right
    c = totals(trace("7+5=12", "<", "2\n12-3=9\n9+9=18\n#### 18") + [EOT])[0]
    assert c["draft_right"] and c["right"] and c["backtrack"] == pytest.approx(-0.2)
    c = totals(trace("7+5=12\n12-3=9\n9+9=18\n#### 18", "<", "<", "18") + [EOT])[0]
    assert c["backtrack"] == pytest.approx(-0.4)


def test_cap_penalty():
    rc = RewardConfig(cap_penalty=1.0)
    over = trace("7+5=13", "<", "x", "<", "y", "<", "2\n12-3=9\n9+9=18\n#### 18") + [EOT]   # 3 BKs, fixed
    assert score(TASK, TOK, PROBLEM, over, budget=2, rc=rc)["backtrack"] == -1.0
    assert score(TASK, TOK, PROBLEM, over, budget=2.5, rc=rc)["backtrack"] == -1.0
    assert score(TASK, TOK, PROBLEM, over, budget=3, rc=rc)["backtrack"] == pytest.approx(0.5 / math.sqrt(3))
    c = score(TASK, TOK, PROBLEM, over, budget=2, rc=rc)
    assert c["over_budget"] and c["outcome"] == 1.0   # the answer still counts; the backtrack part is capped
    with pytest.raises(AssertionError):
        RewardConfig(correction_bonus=1.0, clean_bonus=1.0)


def test_weight_and_budget_curricula_at_phase_boundaries():
    ws = WeightSchedule.from_string("notes")
    early = dict(outcome=0.5, process=0.8, backtrack=0.8, format=0.3)
    middle = dict(outcome=0.7, process=0.7, backtrack=0.6, format=0.3)
    late = dict(outcome=1.0, process=0.5, backtrack=0.4, format=0.3)
    assert ws.at(0.0) == early and ws.at(0.3299) == early
    assert ws.at(0.33) == middle and ws.at(0.6699) == middle
    assert ws.at(0.67) == late and ws.at(1.0) == late
    custom = WeightSchedule.from_string("0:outcome=1;0.5:outcome=2,backtrack=0.1")
    assert custom.at(0.49) == dict(outcome=1.0, process=0.0, backtrack=0.0, format=0.0)
    assert custom.at(0.5) == dict(outcome=2.0, process=0.0, backtrack=0.1, format=0.0)
    assert WeightSchedule.from_string("outcome=1,format=0.5").at(0.7)["format"] == 0.5
    with pytest.raises(ValueError):
        WeightSchedule.from_string("0:outcome=1,speed=2")
    assert budget_at("exp", 0.0, 8, 2, 0.25) == 8.0
    assert budget_at("exp", 0.5, 8, 2, 0.25) == pytest.approx(4.0)
    assert budget_at("exp", 1.0, 8, 2, 0.25) == 2.0
    assert budget_at("exp", 1.0, 8, 3, 0.25) == 3.0                   # the floor
    assert budget_at("0:8,0.5:4,0.8:2", 0.4999) == 8
    assert budget_at("0:8,0.5:4,0.8:2", 0.5) == 4
    assert budget_at("0:8,0.5:4,0.8:2", 0.8) == 2
    assert budget_at("none", 0.3) is None

# -----------------------------------------------------------------------------
# the objective against hand-computed values


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 1.0, 2.0, 2.0], dtype=torch.float64)
    s1 = math.sqrt(1 / 3)   # unbiased std of (1, 0, 0, 1)
    s3 = math.sqrt(2 / 3)   # of (3, 1, 2, 2)
    want_none = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 1, -1, 0, 0]
    assert group_advantages(r, 4, "none").tolist() == pytest.approx(want_none)
    want_group = [x / (s + 1e-4) for x, s in zip(want_none, [s1] * 4 + [0.0] * 4 + [s3] * 4)]
    assert group_advantages(r, 4, "group").tolist() == pytest.approx(want_group)
    assert group_advantages(r, 4, "group")[4:8].tolist() == [0, 0, 0, 0]   # a constant group teaches nothing
    sb = float(r.std())
    assert group_advantages(r, 4, "batch").tolist() == pytest.approx([x / (sb + 1e-4) for x in want_none])
    assert group_advantages(r, 4, "batch", batch_std=2.0).tolist() == pytest.approx([x / 2.0001 for x in want_none])


def test_loss_normalisers():
    lengths = torch.tensor([2, 4, 0, 6])   # the third completion is masked (length 0 here)
    # dapo: every token of the global batch weighs the same
    assert sequence_weights(lengths, "dapo", 3, 12, 10).tolist() == pytest.approx([1 / 12, 1 / 12, 0, 1 / 12])
    # grpo: mean over each sequence, then over sequences
    assert sequence_weights(lengths, "grpo", 3, 12, 10).tolist() == pytest.approx([1 / 6, 1 / 12, 0, 1 / 18])
    # dr_grpo: one constant, sequences * max_new_tokens
    assert sequence_weights(lengths, "dr_grpo", 4, 12, 10).tolist() == pytest.approx([1 / 40, 1 / 40, 0, 1 / 40])
    # the loss these weights give, for token losses x: dapo = sum / 12, grpo = mean of per-sequence means
    x = [torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0, 2.0, 6.0]), torch.tensor([]), torch.arange(6.0)]
    for kind, want in [("dapo", (4 + 12 + 15) / 12), ("grpo", (2 + 3 + 2.5) / 3), ("dr_grpo", 31 / 40)]:
        w = sequence_weights(lengths, kind, 4 if kind == "dr_grpo" else 3, 12, 10)
        got = sum(float((xi * wi).sum()) for xi, wi in zip(x, w))
        assert got == pytest.approx(want), kind


def test_clipped_objective():
    old = torch.zeros(5)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 2.0])
    loss, low, high = clipped_objective(logp, old, adv, 0.2, 0.28)
    # r=1.5,A=+1: clipped at 1.28 | r=0.5,A=-1: clipped at 0.8 | r=1.5,A=-1: unclipped | r=0.5,A=+1: unclipped
    assert loss.tolist() == pytest.approx([-1.28, 0.8, 1.5, -0.5, -2.2])
    assert low.tolist() == [False, True, False, False, False]
    assert high.tolist() == [True, False, False, False, False]
    loss.sum().backward()
    # clipped tokens carry no gradient; the others d(-r A)/dlogp = -r A
    assert logp.grad.tolist() == pytest.approx([0.0, 0.0, 1.5, -0.5, -2.2])


def test_kl_k3():
    logp = torch.log(torch.tensor([0.5, 0.2]))
    ref = torch.log(torch.tensor([0.25, 0.2]))
    assert kl_k3(logp, ref).tolist() == pytest.approx([0.5 - math.log(0.5) - 1, 0.0], abs=1e-7)

# -----------------------------------------------------------------------------
# runs


SMALL = ["--prompts_per_step=2", "--group_size=3", "--max_new_tokens=12", "--eval_n=4", "--log_interval=1",
         "--progress=False", "--n_train=50", "--warmup_iters=1", "--lr=1e-3", "--min_lr=1e-3"]


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sft") / "sft")
    tiny(bk_pull=1.5).save(path, meta=dict(task="arith", task_kwargs={}, policy="rewind", max_new_tokens=12,
                                           stage="sft"))
    return path


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def test_smoke_two_steps(sft_ckpt, tmp_path):
    out = str(tmp_path / "grpo")
    train_grpo.main(SMALL + [f"--init_from={sft_ckpt}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
                             "--num_iterations=2", "--beta=0.05", "--loss_type=grpo", "--mask_truncated=True"])
    rows = metrics(out)
    steps = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in steps] == [0, 1]
    for k in ["reward/outcome_mean", "reward/backtrack_std", "zero_std_groups", "completion_len", "truncated",
              "bk_per_sample", "acc", "clip_low", "clip_high", "kl", "rollout_tokens_per_s", "budget"]:
        assert k in steps[0], k
    assert any("eval/greedy/acc" in r for r in rows) and any("eval/t1/bk_per_sample" in r for r in rows)
    m = GPT.from_pretrained(out)
    assert m.meta["stage"] == "grpo" and m.meta["step"] == 2 and m.meta["sft_checkpoint"] == sft_ckpt


def test_resume_is_exact(sft_ckpt, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    common = SMALL + [f"--init_from={sft_ckpt}", "--max_iters=4", "--eval_interval=0", "--save_interval=100"]
    train_grpo.main(common + [f"--out_dir={full}"])
    train_grpo.main(common + [f"--out_dir={part}", "--stop_at=2"])
    train_grpo.main(SMALL + ["--init_from=resume", f"--out_dir={part}", "--max_iters=4", "--eval_interval=0",
                             "--save_interval=100"])
    a = {r["step"]: r["reward_mean"] for r in metrics(full)}
    b = {r["step"]: r["reward_mean"] for r in metrics(part)}
    assert a == b
    x = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        assert torch.equal(GPT.from_pretrained(full)(x), GPT.from_pretrained(part)(x))


def test_embedding_only_grpo_moves_only_the_backtrack_rows(sft_ckpt, tmp_path):
    """Research notes 5.4: RL on the backtrack token's embedding alone."""
    out = str(tmp_path / "emb")
    train_grpo.main(SMALL + [f"--init_from={sft_ckpt}", f"--out_dir={out}", "--max_iters=3", "--eval_interval=0",
                             "--embedding_only=True", "--lr=1e-2"])
    only_bk_rows_moved(GPT.from_pretrained(sft_ckpt), GPT.from_pretrained(out))


def test_logprob_mismatch_is_caught(sft_ckpt, tmp_path, monkeypatch):
    real = train_grpo.rollout_logprobs
    monkeypatch.setattr(train_grpo, "rollout_logprobs", lambda m, b, c: real(m, b, c) + 1e-2)
    with pytest.raises(RuntimeError, match="recomputed log-probs differ"):
        train_grpo.main(SMALL + [f"--init_from={sft_ckpt}", f"--out_dir={tmp_path / 'x'}", "--max_iters=1",
                                 "--eval_interval=0"])


def test_missing_sft_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="train_sft.py"):
        train_grpo.main([f"--init_from={tmp_path / 'nope'}", f"--out_dir={tmp_path / 'o'}"])
