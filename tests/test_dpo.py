"""self_errors.py and train_dpo.py: self-error traces resolve to the reference, the Toolformer-style
filter keeps and drops hand-built cases, the DPO losses match hand computation, only completion
tokens are scored, and the whole chain (SFT -> self errors -> SFT round two / DPO, resume) runs."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import self_errors
import train_dpo
from conftest import only_bk_rows_moved
import model as modellib
import train_sft
from data import Rule, Trace, collate, layout, read_traces, resolve
from model import GPT, GPTConfig, action_logprobs
from tasks import get_task
from tokenizer import get_tokenizer

TOK = get_tokenizer("byte")
BK, EOT = TOK.bk_id, TOK.eot_id
ARITH = get_task("arith")
P35 = ARITH.problem([3, 5, 2], ["+", "-"])    # solution '3+5=8\n8-2=6\n#### 6'


def ids(s):
    return TOK.encode(s)


def cfg(**kw):
    return SimpleNamespace(**{**dict(max_error=8, divergence="step"), **kw})


def make(p, completion, task=ARITH, **kw):
    prompt = ids(task.prompt(p))
    return self_errors.candidate(TOK, task, p, prompt, ids(completion) + [EOT], cfg(**kw))

# -----------------------------------------------------------------------------
# traces from wrong completions


def test_trace_from_a_wrong_step_is_exact():
    c, why = make(P35, "3+5=9\n9-2=7\n#### 7")
    assert why is None
    ref = ids(P35["solution"]) + [EOT]
    # correct prefix '3+5=', the error '9\n' (to the end of its line), two BKs, the rest of the reference
    assert c["response"] == ids("3+5=9\n") + [BK, BK] + ids("8\n8-2=6\n#### 6") + [EOT]
    assert resolve(c["response"], BK) == ref
    assert c["prefix"] == ids("3+5=9\n") and c["rejected"] == ids("9-2=7\n#### 7") + [EOT]


def test_error_span_is_capped_and_never_holds_end_of_text():
    c, _ = make(P35, "3+5=9\n9-2=7\n#### 7", max_error=1)
    assert c["prefix"] == ids("3+5=9") and c["n_err"] == 1
    c, _ = make(P35, "3+5=8\n8-2=6\n#### 7")        # wrong in the last line, which ends in end-of-text
    assert c["prefix"] == ids("3+5=8\n8-2=6\n#### 7") and c["rejected"] == [EOT]
    assert resolve(c["response"], BK) == ids(P35["solution"]) + [EOT]


def test_unusable_completions():
    assert make(P35, "3+5=8\n8-2=6")[1] == "ended_early"            # stopped where the reference goes on
    prompt = ids(ARITH.prompt(P35))
    assert self_errors.candidate(TOK, ARITH, P35, prompt, ids("3+5=8\n8-"), cfg())[1] == "cut_off"


def test_step_mode_drops_another_valid_route():
    cd = get_task("countdown")
    p = dict(question="make 10 from 2 3 5", answer="10", nums=[2, 3, 5], target=10,
             solution="2+3=5\n5+5=10\n#### 10")
    other = "5*2=10\n#### 10"                        # diverges at the first token with a valid step
    assert make(p, other, task=cd)[1] == "valid_step"
    c, why = make(p, other, task=cd, divergence="token")
    assert why is None and resolve(c["response"], BK) == ids(p["solution"]) + [EOT]
    c, why = make(p, "2+3=6\n6+5=11\n#### 11", task=cd)   # a wrong step is an error in both modes
    assert why is None and c["prefix"] == ids("2+3=6\n")


def test_step_mode_reads_arith_steps_per_required_step():
    # arith checks one step per required step (a missing one is a failed check), so a line that
    # holds a valid step turns a failed check into a pass: it is another spelling, not an error
    assert make(P35, "3+5=08\n8-2=6\n#### 6")[1] == "valid_step"
    c, why = make(P35, "3+5=8\n8-2=7\n#### 7")                 # a wrong second step is an error
    assert why is None and c["prefix"] == ids("3+5=8\n8-2=7\n")


GPT2 = get_tokenizer("gpt2")
P12 = ARITH.problem([7, 5, 6], ["+", "+"])    # solution '7+5=12\n12+6=18\n#### 18'


def spell(*pieces):
    """gpt2 ids of each text piece encoded on its own: '1', '2' is not the one token '12'."""
    return [t for x in pieces for t in GPT2.encode(x)]


def gpt2_candidate(resolved, **kw):
    return self_errors.candidate(GPT2, ARITH, P12, GPT2.encode(ARITH.prompt(P12)), resolved, cfg(**kw))


@pytest.mark.parametrize("divergence", ["step", "token"])
def test_same_text_in_other_tokens_is_not_an_error(divergence):
    ref = GPT2.encode(P12["solution"]) + [GPT2.eot_id]
    odd = spell("7", "+", "5", "=", "1", "2", "\n", "1", "2", "+", "6", "=", "1", "8", "\n", "#", "###", " ", "1", "8")
    assert odd != ref[:-1] and GPT2.decode(odd) == P12["solution"]
    c, why = gpt2_candidate(odd + [GPT2.eot_id], divergence=divergence)
    assert c is None and why in ("correct", "cut_off")
    c, why = gpt2_candidate(odd[:9], divergence=divergence)     # '7+5=12\n12' cut off, non-canonically
    assert c is None and why == "cut_off"


@pytest.mark.parametrize("divergence", ["step", "token"])
@pytest.mark.parametrize("wrong", [("19",), ("1", "9")])
def test_divergence_is_found_on_the_text(divergence, wrong):
    # a correct first line and '12+6=' in other tokens than the reference's, then a wrong number
    resolved = spell("7", "+", "5", "=", "1", "2", "\n", "1", "2", "+", "6", "=", *wrong, "\n", "####", " 19") \
        + [GPT2.eot_id]
    ref = GPT2.encode(P12["solution"]) + [GPT2.eot_id]
    c, why = gpt2_candidate(resolved, divergence=divergence)
    assert why is None
    bk = GPT2.bk_id
    assert resolve(c["response"], bk) == ref                                   # exact, in ids
    err = c["prefix"][len(c["prefix"]) - c["n_err"]:]
    assert GPT2.decode(err) == "19\n"                                           # only the wrong part is deleted
    assert err == spell(*wrong, "\n")                                           # the model's own tokens
    assert c["response"] == c["prefix"] + [bk] * c["n_err"] + c["correction"]
    assert GPT2.decode(c["prefix"][:-c["n_err"]]) == "7+5=12\n12+6="            # the correct text survives
    assert c["rejected"] == spell("####", " 19") + [GPT2.eot_id]


def test_respelled_completions_are_judged_on_their_text():
    # slips, the solution and its prefixes, each cut into random pieces encoded on their own
    import random
    rng = random.Random(0)
    task = get_task("arith", digits=2)
    bk, eot = GPT2.bk_id, GPT2.eot_id
    for p in task.problems("train", n=100):
        ref = GPT2.encode(p["solution"]) + [eot]
        for text in (task.slip(p, rng), p["solution"], p["solution"][:rng.randrange(len(p["solution"]))]):
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 5))) if len(text) > 1 else []
            resolved = spell(*[text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]) + [eot]
            c, why = self_errors.candidate(GPT2, task, p, [0], resolved, cfg(divergence="token"))
            if p["solution"].startswith(text):
                assert c is None and why in ("correct", "ended_early")
                continue
            assert why is None and resolve(c["response"], bk) == ref
            kept, err = c["prefix"][:len(c["prefix"]) - c["n_err"]], c["prefix"][len(c["prefix"]) - c["n_err"]:]
            deleted = GPT2.decode(err)
            assert "\n" not in deleted[:-1]                      # never a correct line, only the wrong one
            assert p["solution"].startswith(GPT2.decode(kept)) and kept == ref[:len(kept)]
            assert not p["solution"].startswith(GPT2.decode(kept) + deleted)
            assert " ".join(map(str, err)) in " ".join(map(str, resolved))   # the model's own tokens


def test_needless_deletion_finds_the_first_correct_token_deleted():
    ref = ids("3+5=8\n") + [EOT]
    # '9' is wrong (a needed deletion), then '=' is deleted while '3+5=' is still right
    r = ids("3+5=9") + [BK, BK] + ids("=8\n") + [EOT]
    assert self_errors.needless_deletion(r, ref, BK) == (4, 6)
    assert self_errors.needless_deletion(ids("3+5=9") + [BK] + ids("8\n") + [EOT], ref, BK) is None


def test_self_errors_main_traces_resolve_to_correct_solutions(tiny_run):
    d, stats = tiny_run["dir"], tiny_run["stats"]
    assert stats["wrong"] > 0 and stats["traces"] > 0 and stats["pairs"] > 0
    by_q = {p["question"]: p for p in ARITH.problems("train", n=12, seed=0)}
    with open(os.path.join(d, "self_traces.jsonl")) as f:
        traces = [json.loads(l) for l in f]
    assert len(traces) == stats["traces"]
    for t in traces:
        p = by_q[t["meta"]["question"]]
        r = resolve(t["response"], BK)
        assert r == ids(p["solution"]) + [EOT]
        assert ARITH.verify(TOK.decode(r[:-1]), p) and BK in t["response"]
    with open(os.path.join(d, "self_pairs.jsonl")) as f:
        pairs = [json.loads(l) for l in f]
    for q in pairs:
        p = by_q[q["question"]]
        ref = ids(p["solution"]) + [EOT]
        assert resolve(q["prefix"] + q["chosen"], BK) == ref
        if q["kind"] == "backtrack":
            assert q["chosen"][:q["n_err"]] == [BK] * q["n_err"] and BK not in q["rejected"]
            assert not ARITH.verify(TOK.decode([t for t in q["prefix"] + q["rejected"] if t != EOT]), p)
        else:   # keep: a correct prefix, then the reference (chosen) or the model's needless BK (rejected)
            assert q["kind"] == "needless" and q["prefix"] + q["chosen"] == ref and q["rejected"][0] == BK
    assert read_traces(os.path.join(d, "self_traces.jsonl"), TOK.n_vocab)  # what SFT round two reads

def test_self_errors_main_with_known_samples(tiny_run, tmp_path, monkeypatch):
    """Samples whose errors are known: a slip (one wrong step, carried on) and a correct answer
    reached after deleting a correct token. Every sample must turn into exactly its pair."""
    import random
    probs = ARITH.problems("train", n=6, seed=0)
    by_prompt = {tuple(ids(ARITH.prompt(p))): p for p in probs}
    calls = {"n": 0}

    def fake_generate(model, prompts, **kw):
        out = []
        for q in prompts:
            p = by_prompt[tuple(q)]
            ref = ids(p["solution"]) + [EOT]
            if calls["n"] % 2 == 0:
                r = ids(ARITH.slip(p, random.Random(calls["n"]))) + [EOT]
            else:
                r = ref[:3] + [BK] + ref[2:]
            calls["n"] += 1
            out.append(dict(response=r, resolved=resolve(r, BK), logprobs=[0.0] * len(r)))
        return out

    monkeypatch.setattr(self_errors, "generate", fake_generate)
    out = str(tmp_path / "self_traces.jsonl")
    stats = self_errors.main([f"--ckpt={tiny_run['sft']}", "--n=6", "--samples=2", f"--out={out}",
                              "--filter_threshold=-1e9"])
    assert stats["wrong"] == 6 and stats["correct"] == 6
    with open(str(tmp_path / "self_pairs.jsonl")) as f:
        pairs = [json.loads(l) for l in f]
    kinds = [q["kind"] for q in pairs]
    assert kinds.count("needless") == stats["needless_pairs"] == len({p["question"] for p in probs})  # one per problem
    assert kinds.count("backtrack") == stats["pairs"] > 0
    for q in pairs:
        p = next(x for x in probs if x["question"] == q["question"])
        ref = ids(p["solution"]) + [EOT]
        assert resolve(q["prefix"] + q["chosen"], BK) == ref
        if q["kind"] == "needless":
            assert q["prefix"] == ref[:3] and q["rejected"] == [BK] + ref[2:]
        else:
            assert BK not in q["prefix"] + q["rejected"] and not ARITH.verify(TOK.decode(q["prefix"] + q["rejected"][:-1]), p)


# -----------------------------------------------------------------------------
# the filter, on a bigram model whose log-probs are known by hand


class Bigram(torch.nn.Module):
    """logits of an action = table[token of the node it acts from]."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(320, 320))
        self.config = SimpleNamespace(n_vocab=TOK.n_vocab, bk_id=BK, eot_id=EOT)

    def forward(self, idx, pos=None, mask=None, act=None):
        return self.table[idx[act[0], act[1]]]


@pytest.mark.parametrize("policy", ["rewind", "keep"])
def test_filter_keeps_and_drops_hand_built_cases(policy):
    c, _ = make(P35, "3+5=9\n9-2=7\n#### 7", max_error=1)   # one error token '9' after '3+5='
    nine, eight, eq = ord("9"), ord("8"), ord("=")
    likes_bk, likes_8 = Bigram(), Bigram()
    with torch.no_grad():
        likes_bk.table[nine, BK] = 10.0     # after its error the model would backtrack
        likes_8.table[nine, eight] = 10.0   # after its error the model would carry on with '8'
    lse = math.log(math.exp(10) + 257)      # row '9' over the 258 real tokens
    # with backtracks: BK from '9', then '8' (rewind: from '=' with '9' banned there; keep: from BK)
    after = -math.log(257) if policy == "rewind" else -math.log(258)
    # hand-computed gains; every later action is the same in both traces and cancels
    want_bk = dict(full=(10 - lse) + after - (0 - lse), correction=after - (0 - lse))
    want_8 = dict(full=(0 - lse) + after - (10 - lse), correction=after - (10 - lse))
    for score in ("full", "correction"):
        g_bk, g_8 = (self_errors.backtrack_gain(m, [dict(c)], BK, Rule(policy), score)[0] for m in (likes_bk, likes_8))
        assert g_bk == pytest.approx(want_bk[score], abs=1e-4)
        assert g_8 == pytest.approx(want_8[score], abs=1e-4)
    kept = self_errors.apply_filter(likes_bk, [dict(c)], BK, Rule(policy), "full", 0.0)
    assert len(kept) == 1 and kept[0]["gain"] > 0
    assert self_errors.apply_filter(likes_8, [dict(c)], BK, Rule(policy), "full", 0.0) == []
    # the threshold is in nats: a gain of ~4.4 passes 4 and fails 5
    assert len(self_errors.apply_filter(likes_bk, [dict(c)], BK, Rule(policy), "full", want_bk["full"] - 0.5)) == 1
    assert self_errors.apply_filter(likes_bk, [dict(c)], BK, Rule(policy), "full", want_bk["full"] + 0.5) == []

# -----------------------------------------------------------------------------
# DPO


def test_dpo_losses_match_hand_computation():
    pi_c, pi_r = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    ref_c, ref_r = torch.tensor([-1.5, -2.0]), torch.tensor([-1.0, -1.5])
    beta = 0.1
    h = [(-1.0 + 1.5) - (-2.0 + 1.0), (-3.0 + 2.0) - (-1.0 + 1.5)]   # 1.5, -1.5
    loss, rc, rr = train_dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, "sigmoid")
    want = [math.log(1 + math.exp(-beta * x)) for x in h]
    assert loss.tolist() == pytest.approx(want, abs=1e-6)
    assert rc.tolist() == pytest.approx([0.05, -0.1]) and rr.tolist() == pytest.approx([-0.1, 0.05])
    loss, _, _ = train_dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, "ipo")
    assert loss.tolist() == pytest.approx([(x - 1 / (2 * beta)) ** 2 for x in h], abs=1e-5)   # 12.25, 42.25
    with pytest.raises(ValueError):
        train_dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, "hinge")


def _pairs():
    a, _ = make(P35, "3+5=9\n9-2=7\n#### 7")
    b, _ = make(P35, "3+5=8\n8-2=5\n#### 5", max_error=2)
    return [dict(prompt=c["prompt"], prefix=c["prefix"], chosen=[BK] * c["n_err"] + c["correction"],
                 rejected=c["rejected"]) for c in (a, b)]


@pytest.mark.parametrize("policy", ["rewind", "keep"])
def test_only_completion_tokens_are_scored(policy, monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    pairs = _pairs()
    batch = train_dpo.pair_batch(pairs, BK, Rule(policy))
    with torch.no_grad():
        got = modellib.completion_logprobs(model, batch)
        # manual: score each full trace, then sum the actions from the end of the shared prefix on
        want = []
        for k in ("chosen", "rejected"):
            for p in pairs:
                t = Trace(p["prompt"], p["prefix"] + p[k])
                lp = action_logprobs(model, collate([layout(t, BK, Rule(policy), mask_errors=False)]))
                want.append(lp[len(p["prefix"]):].sum().item())
    assert got.tolist() == pytest.approx(want, abs=1e-4)
    # moving the log-prob of any prefix action (even to -inf) leaves the sums as they were;
    # moving a completion action moves its own row by exactly that much
    real = modellib.action_logprobs
    shift = {"prefix": float("-inf"), "first": 0.0}

    def patched(m, b, *a, **kw):
        lp = real(m, b, *a, **kw)
        lp = torch.where(b.weight > 0, lp, torch.full_like(lp, shift["prefix"]))
        first = (b.weight > 0).nonzero()[0, 0]    # the first completion action of row 0
        return lp + F.one_hot(first, lp.numel()).to(lp) * shift["first"]

    monkeypatch.setattr(modellib, "action_logprobs", patched)
    with torch.no_grad():
        assert modellib.completion_logprobs(model, batch).tolist() == pytest.approx(want, abs=1e-4)
        shift.update(prefix=100.0, first=1.0)
        moved = modellib.completion_logprobs(model, batch).tolist()
    assert moved == pytest.approx([want[0] + 1.0] + want[1:], abs=1e-4)


def test_pair_indices_cover_each_pair_once_per_epoch():
    n, size = 10, 4
    seq = [i for s in range(5) for i in train_dpo.pair_indices(s, 7, n, size)]
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:20]) == list(range(10))
    assert train_dpo.pair_indices(3, 7, n, size) == train_dpo.pair_indices(3, 7, n, size)

# -----------------------------------------------------------------------------
# the chain end to end on a tiny checkpoint

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=128", "--n_train=200", "--eval_n=4",
        "--max_new_tokens=24", "--log_interval=1", "--progress=False", "--warmup_iters=2", "--lr=3e-3"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("self_errors"))
    sft = os.path.join(d, "sft")
    train_sft.main(TINY + [f"--out_dir={sft}", "--max_iters=20", "--eval_interval=0"])
    # threshold -inf: a barely trained model's gains are all negative, and the chain must still run
    stats = self_errors.main([f"--ckpt={sft}", "--n=12", "--samples=2", f"--out={d}/self_traces.jsonl",
                              "--filter_threshold=-1e9", "--max_new_tokens=24"])
    return dict(dir=d, sft=sft, stats=stats)


def dpo_args(run, out, *extra):
    return [f"--init_from={run['sft']}", f"--out_dir={out}", f"--pairs_file={run['dir']}/self_pairs.jsonl",
            "--max_iters=2", "--batch_size=4", "--eval_n=4", "--max_new_tokens=16", "--progress=False",
            "--log_interval=1", "--lr=1e-3", "--warmup_iters=1", *extra]


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def test_embedding_only_dpo_moves_only_the_backtrack_rows(tiny_run, tmp_path):
    out = str(tmp_path / "emb")
    train_dpo.main(dpo_args(tiny_run, out, "--eval_interval=0", "--embedding_only=True", "--lr=1e-2", "--max_iters=3"))
    only_bk_rows_moved(GPT.from_pretrained(tiny_run["sft"]), GPT.from_pretrained(out))


def test_dpo_smoke_and_exact_resume(tiny_run, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train_dpo.main(dpo_args(tiny_run, full, "--eval_interval=2"))
    m = [r for r in rows(full) if "loss" in r]
    assert [r["step"] for r in m] == [0, 1]
    # step 0: the policy is the reference, so every implicit reward is 0 and the loss is log 2
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and m[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies"} <= m[1].keys()
    assert sum("eval/greedy/acc" in r for r in rows(full)) == 2       # at start and at the end
    ck = GPT.from_pretrained(full)
    assert ck.meta["stage"] == "dpo" and os.path.exists(os.path.join(full, "ref_logprobs.pt"))
    # interrupted after one step, then resumed: the same losses and weights, bit for bit
    train_dpo.main(dpo_args(tiny_run, part, "--eval_interval=0", "--stop_at=1"))
    train_dpo.main(dpo_args(tiny_run, part, "--eval_interval=0", "--init_from=resume"))
    assert [r["loss"] for r in rows(part) if "loss" in r] == [r["loss"] for r in m]
    x = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        assert torch.equal(ck(x), GPT.from_pretrained(part)(x))
    train_dpo.main(dpo_args(tiny_run, str(tmp_path / "ipo"), "--eval_interval=0", "--loss_type=ipo", "--beta=0.5"))
    assert rows(str(tmp_path / "ipo"))[0]["loss"] == pytest.approx(1.0, abs=1e-5)   # (0 - 1/(2*0.5))^2


def test_sft_round_two_reads_the_traces(tiny_run, tmp_path):
    out = str(tmp_path / "sft2")
    train_sft.main(TINY + [f"--init_from={tiny_run['sft']}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=0",
                           f"--traces_file={tiny_run['dir']}/self_traces.jsonl", "--traces_ratio=0.5"])
    assert GPT.from_pretrained(out).meta["step"] == 2


def test_pairs_with_a_banned_completion_action_are_refused(tmp_path):
    import train_dpo
    pairs = [dict(prompt=[1, 2], prefix=[5], chosen=[BK, 5, 6], rejected=[7])]
    with pytest.raises(SystemExit, match="pair 1: its chosen completion takes token 5"):
        train_dpo.check_pairs(pairs, "p.jsonl", BK, Rule("rewind"))
    train_dpo.check_pairs(pairs, "p.jsonl", BK, Rule("keep"))   # under keep, rewriting it is allowed
