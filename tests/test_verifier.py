"""The verifier head (docs/backtrack-semantics.md §2 for the token roles it is trained from):
its targets, its agreement between the training layout and decoding and between one row and many,
triggered decoding, and that a zero weight leaves today's training untouched."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from data import ERROR, Rule, Trace, collate, layout, resolve, roles
from decode import generate, replay
from model import GPT, GPTConfig, action_logprobs, add_verifier, sft_loss, sft_verifier_loss

BK, EOT, V = 257, 256, 258


def tiny(verifier=True, pos="learned", seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=96, vocab_size=320, n_vocab=V, eot_id=EOT, bk_id=BK, n_layer=2, n_head=2, n_embd=32,
                    pos=pos)
    return add_verifier(GPT(cfg)).eval() if verifier else GPT(cfg).eval()


def random_trace(rng, n=24):
    prompt = [rng.randrange(200) for _ in range(rng.randint(1, 6))]
    resp, depth = [], 0
    for _ in range(rng.randint(0, n)):
        if depth and rng.random() < 0.3:
            resp.append(BK)
            depth -= 1
        else:
            resp.append(rng.randrange(200))
            depth += 1
    return Trace(prompt, resp)


def test_targets_are_the_role_of_the_last_surviving_token():
    """At each action: 1 when the top of the surviving response is a token deleted later (ERROR),
    0 when it survives, -1 before any response token; the same under both policies."""
    rng = random.Random(0)
    for _ in range(300):
        t = random_trace(rng)
        rl = roles(t.response, BK)
        expect = []
        for i in range(len(t.response)):
            stack = []   # indices of the surviving response tokens before action i
            for j, x in enumerate(t.response[:i]):
                if x == BK:
                    stack and stack.pop()
                else:
                    stack.append(j)
            assert [t.response[j] for j in stack] == resolve(t.response[:i], BK)
            expect.append(-1.0 if not stack else float(rl[stack[-1]] == ERROR))
        for policy in ("keep", "rewind"):
            assert layout(t, BK, Rule(policy), mask_errors=False)["wrong"] == expect


@pytest.mark.parametrize("policy", ["keep", "rewind"])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_head_agrees_between_layout_and_decoding_and_one_row_and_many(policy, pos):
    """The head reads the hidden state the next action's logits come from: on a forced replay of
    traces, decoding's probabilities equal the training forward's at each action's source node,
    for the rows decoded together and each row alone."""
    model = tiny(pos=pos)
    rng = random.Random(1)
    traces = [random_trace(rng) for _ in range(6)]
    traces = [t for t in traces if t.response]
    batch = collate([layout(t, BK, Rule(policy), mask_errors=False) for t in traces])
    with torch.no_grad():
        _, v = model(batch.ids, batch.pos, batch.mask, act=(batch.act_row, batch.act_src), verify=True)
    trained = torch.sigmoid(v)
    kw = dict(rule=Rule(policy, slot_bans=False), temperature=1.0, return_verifier=True)
    together = replay(model, [t.prompt for t in traces], [t.response for t in traces], **kw)
    alone = [replay(model, [t.prompt], [t.response], **kw)[0] for t in traces]
    decoded = torch.tensor([p for o in together for p in o["verifier"]])
    assert decoded.shape == trained.shape
    assert torch.allclose(decoded, trained, atol=1e-5)
    for a, b in zip(together, alone):
        assert torch.allclose(torch.tensor(a["verifier"]), torch.tensor(b["verifier"]), atol=1e-5)


@pytest.mark.parametrize("policy", ["keep", "rewind"])
def test_trigger_forces_a_backtrack_wherever_one_is_allowed(policy):
    """A head that always says 'wrong' (bias +10) fires a BK at every step where BK is not banned:
    never on an empty response, and not once the cap is spent; the same for one row and many, and
    each forced BK's log-prob is the one the training layout gives it."""
    model = tiny()
    with torch.no_grad():
        model.verifier.weight.zero_()
        model.verifier.bias.fill_(10.0)
    prompts = [[5, 6, 7], [9], [11, 12]]
    kw = dict(rule=Rule(policy), temperature=0.0, max_new_tokens=12, max_backtracks=3, trigger=0.5,
              stop_at_eot=False)
    together = generate(model, prompts, **kw)
    for b, o in enumerate(together):
        r = o["response"]
        assert r[1:7:2] == [BK] * 3 and BK not in r[0:7:2] and BK not in r[7:], r
        alone = generate(model, [prompts[b]], **kw)[0]
        assert alone["response"] == r
        L = collate([layout(Trace(prompts[b], r), BK, Rule(policy), mask_errors=False, max_backtracks=3)])
        with torch.no_grad():
            lp = action_logprobs(model, L)
        assert torch.allclose(lp, torch.tensor(o["logprobs"]), atol=1e-5)
    # a head that always says 'right' (bias -10) never fires: the same actions as no trigger at all
    with torch.no_grad():
        model.verifier.bias.fill_(-10.0)
    quiet = generate(model, prompts, **kw)
    assert [o["response"] for o in quiet] == [o["response"] for o in generate(model, prompts, **dict(kw, trigger=0.0))]
    assert any(BK not in o["response"][:7] for o in quiet)
    with pytest.raises(ValueError, match="verifier head"):
        generate(tiny(verifier=False), prompts, trigger=0.5)


def test_the_lm_loss_is_untouched_by_the_head():
    """sft_verifier_loss's LM part is sft_loss's number, bit for bit, and a model without the head
    computes the same logits as the same model with one (the head reads, never writes)."""
    rng = random.Random(2)
    # no slot bans: a random trace may rewrite a deleted token, whose log-prob would be -inf under them
    batch = collate([layout(random_trace(rng), BK, Rule("rewind", False)) for _ in range(5)])
    with_head, without = tiny(seed=4), tiny(verifier=False, seed=4)
    lm, v = sft_verifier_loss(with_head, batch)
    assert torch.isfinite(lm) and lm.item() > 0
    assert torch.equal(lm, sft_loss(with_head, batch)) and torch.equal(lm, sft_loss(without, batch))
    assert not torch.equal(lm, sft_loss(tiny(verifier=False, seed=5), batch))   # (other weights, another loss)
    # the head's part is the mean BCE over the scored actions, by hand
    with torch.no_grad():
        h = with_head.hidden(batch.ids, batch.pos, batch.mask)[batch.act_row, batch.act_src]
        p = torch.sigmoid(with_head.verifier(h).squeeze(-1))
    y, scored = batch.wrong, batch.wrong >= 0
    assert 0 < scored.sum() < len(y)
    bce = -(y * p.log() + (1 - y) * (1 - p).log())[scored].mean()
    assert torch.allclose(v, bce, atol=1e-6)


def test_verifier_training_run_and_export(tmp_path):
    """train_sft.py --verifier_weight: the head trains (its loss falls), is saved and reloaded; the
    exported Hugging Face folder leaves it out; --verifier_weight=0 (the default) adds no head."""
    from safetensors import safe_open
    tiny_args = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=128", "--n_train=200", "--eval_interval=0",
                 "--log_interval=1", "--progress=False", "--lr=3e-3", "--max_iters=30", "--batch_size=16"]
    out = str(tmp_path / "v")
    p = subprocess.run([sys.executable, "train_sft.py", f"--out_dir={out}", "--verifier_weight=1.0", *tiny_args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    losses = [json.loads(line)["verifier_loss"] for line in open(os.path.join(out, "metrics.jsonl"))
              if "verifier_loss" in line]
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])
    model = GPT.from_pretrained(out)
    assert model.config.verifier and model.verifier is not None
    model.export_hf(str(tmp_path / "hf"))
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "verifier" in k]
    plain = str(tmp_path / "plain")
    p = subprocess.run([sys.executable, "train_sft.py", f"--out_dir={plain}", *tiny_args[:-2], "--max_iters=2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert GPT.from_pretrained(plain).verifier is None
    # --trigger on a checkpoint without the head: one line naming it, non-zero exit
    for args in (["generate.py", "--prompt=1+2"], ["evaluate.py", "--n=2"]):
        p = subprocess.run([sys.executable, *args, f"--ckpt={plain}", "--trigger=0.5"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "verifier head" in p.stderr, p.stderr


def test_resume_keeps_the_head_as_it_was(tmp_path):
    """A run resumes with its own verifier setting; switching --verifier_weight between 0 and > 0 on
    resume (the optimizer state holds the head's moments, or does not) is one line naming the flag."""
    tiny_args = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=128", "--n_train=100", "--eval_interval=0",
                 "--progress=False", "--max_iters=4", "--batch_size=4", "--save_interval=2", "--stop_at=2"]
    for weight, switched in (("1.0", "0"), ("0", "1.0")):
        out = str(tmp_path / f"w{weight}")
        run = lambda *a: subprocess.run([sys.executable, "train_sft.py", f"--out_dir={out}", *tiny_args, *a], cwd=ROOT,
                                        capture_output=True, text=True, timeout=300)
        p = run(f"--verifier_weight={weight}")
        assert p.returncode == 0, p.stderr
        p = run("--init_from=resume", f"--verifier_weight={switched}")
        assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "--verifier_weight" in p.stderr, p.stderr
        p = run("--init_from=resume", "--stop_at=0")   # its own setting, from the saved run
        assert p.returncode == 0, p.stderr
        assert (GPT.from_pretrained(out).verifier is not None) == (weight != "0")
