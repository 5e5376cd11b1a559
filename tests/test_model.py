"""Model invariants: HF parity, cached decoding, training/inference equivalence per policy,
in-place rewinds, RL log-probs, checkpoint round trips, and loop-free greedy rewind."""
import copy
import os
import random

import numpy as np
import pytest
import torch

from conftest import FIXTURES
from data import Rule, Trace, collate, layout, resolve
from tokenizer import Tokenizer
from decode import generate, replay
from model import GPT, GPTConfig, KVCache, action_logprobs, init_bk_embedding

V, EOT, BK = 50, 48, 49


def tiny(kind="gpt2", seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(block_size=96, vocab_size=64, n_vocab=V, eot_id=EOT, bk_id=BK, n_layer=2, n_head=2, n_embd=32)
    if kind == "llama":
        base.update(n_head=4, n_kv_head=2, bias=False, norm="rmsnorm", mlp="swiglu", pos="rope",
                    qk_norm=True, tie_embeddings=False)
    base.update(kw)
    return GPT(GPTConfig(**base)).eval()


def random_trace(rng, n_max=24, p_bk=0.35):
    P = [rng.randrange(EOT) for _ in range(rng.randint(1, 6))]
    R, depth = [], 0
    for _ in range(rng.randint(1, n_max)):
        if rng.random() < p_bk:  # BKs may also fall on an empty response (a no-op)
            R.append(BK); depth = max(depth - 1, 0)
        else:
            R.append(rng.randrange(EOT)); depth += 1
    return Trace(P, R)


def test_gpt2_parity_with_reference_logits():
    path = os.path.join(FIXTURES, "hf_gpt2_tiny")
    m = GPT.from_pretrained(path)
    ids = torch.from_numpy(np.load(os.path.join(path, "ref_input_ids.npy")))
    ref = torch.from_numpy(np.load(os.path.join(path, "ref_logits.npy")))
    with torch.no_grad():
        out = m(ids)[..., :ref.shape[-1]]
    assert (out - ref).abs().max().item() < 1e-5
    assert m.config.bk_id == 1000 and m.config.vocab_size >= 1001  # room for the backtrack token


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_cached_decoding_equals_full_forward(kind):
    m = tiny(kind)
    ids = torch.randint(0, EOT, (3, 20))
    with torch.no_grad():
        full = m(ids)
        cache = KVCache(m.config, 3, 32)
        steps = []
        for t in range(20):
            pos = torch.full((3, 1), t)
            steps.append(m(ids[:, t:t + 1], pos, cache=cache))
            cache.lengths += 1
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("policy", ["keep", "rewind"])
def test_training_layout_equals_cached_decoding(kind, policy):
    """Invariant 2: one batched training forward equals step-by-step decoding that rewinds in place."""
    m = tiny(kind)
    rng = random.Random(1)
    for _ in range(5):
        traces = [random_trace(rng) for _ in range(4)]
        batch = collate([layout(t, BK, Rule(policy)) for t in traces])
        with torch.no_grad():
            train = m.action_logits(batch)
        out = replay(m, [t.prompt for t in traces], [t.response for t in traces], Rule(policy), return_logits=True)
        dec = torch.cat([torch.stack(o["logits"]) for o in out])
        assert train.shape == dec.shape
        assert (train - dec).abs().max().item() < 1e-5
        for t, o in zip(traces, out):
            assert o["resolved"] == resolve(t.response, BK)


def test_rewind_layout_hides_errors():
    """Under `rewind` the correction after `E1 E2 BK BK` sees exactly the prompt, at the same slot."""
    m = tiny()
    P, C = [1, 2, 3], [7, 8]
    err = Trace(P, [30, 31, BK, BK] + C)
    clean = Trace(P, C)
    with torch.no_grad():
        a = m.action_logits(collate([layout(err, BK, Rule("rewind"))]))
        b = m.action_logits(collate([layout(clean, BK, Rule("rewind"))]))
        k = m.action_logits(collate([layout(err, BK, Rule("keep"))]))
    # actions of the error trace: E1, E2, BK, BK, C1, C2; the last two equal the clean trace's
    assert torch.allclose(a[4:], b[:2], atol=1e-6)
    assert torch.allclose(a[0], a[4], atol=1e-6)          # the prompt slot acts again, same logits
    assert not torch.allclose(k[4:], b[:2], atol=1e-3)    # `keep` sees the errors


def test_layout_bans_and_targets():
    P = [1, 2]
    t = Trace(P, [10, 11, BK, BK, 12, EOT])
    L = layout(t, BK, Rule("rewind"))
    # slots act: prompt E1 ; E1 -> E2 ; E2 -> BK ; E1 -> BK ; prompt -> C ; C -> EOT
    assert L["src"] == [1, 2, 3, 2, 1, 4]
    assert L["ids"] == [1, 2, 10, 11, 12] and L["pos"] == [0, 1, 2, 3, 2]
    assert L["parent"] == [-1, 0, 1, 2, 1]
    assert L["weight"] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert BK in L["bans"][0]                  # nothing to delete yet
    assert L["bans"][3] == (11,)               # E1's slot: E2 was deleted there
    assert L["bans"][4] == (10, BK)            # prompt slot: E1 deleted there, and the response is empty
    assert L["bans"][5] == ()
    Lu = layout(t, BK, Rule("rewind"), mask_errors=False)
    assert Lu["weight"] == [1.0] * 6
    Lk = layout(t, BK, Rule("keep"), max_backtracks=1)
    assert BK in Lk["bans"][3] and BK not in Lk["bans"][2]   # the cap bans BK once one is spent


def test_rewind_is_in_place_and_per_row():
    """Invariant 3: a rewind moves one row's length pointer; no cache tensor is copied or changed."""
    m = tiny()
    cache = KVCache(m.config, 3, 40)
    with torch.no_grad():
        m.hidden(torch.randint(0, EOT, (3, 10)), torch.arange(10).expand(3, 10), cache=cache)
    cache.lengths.fill_(10)
    ptrs = (cache.k.data_ptr(), cache.v.data_ptr(), cache.h.data_ptr(), cache.lengths.data_ptr())
    before = (cache.k.clone(), cache.v.clone())
    cache.pop(torch.tensor([1]))
    cache.pop(torch.tensor([False, False, True]), 3)
    assert cache.lengths.tolist() == [10, 9, 7]
    assert (cache.k.data_ptr(), cache.v.data_ptr(), cache.h.data_ptr(), cache.lengths.data_ptr()) == ptrs
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])


def test_rollout_logprobs_match_training_forward():
    """Invariant 4: every sampled action's log-prob (temperature, top-k, top-p, bans) is recomputed."""
    for policy in ["keep", "rewind"]:
        for (T, k, p) in [(1.0, 0, 1.0), (0.7, 12, 0.9), (1.3, 0, 0.8)]:
            m = tiny()
            with torch.no_grad():   # steer the final hidden state towards BK: sampled ~1 in 8
                u = torch.nn.functional.normalize(torch.randn(32), dim=0)
                m.transformer.ln_f.bias.copy_(u)
                m.transformer.wte.weight[BK] = 2 * u
            prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
            out = generate(m, prompts, max_new_tokens=30, rule=Rule(policy), temperature=T, top_k=k, top_p=p,
                           max_backtracks=4, seed=0)
            traces = [Trace(pr, o["response"]) for pr, o in zip(prompts, out)]
            assert sum(r.count(BK) for r in (o["response"] for o in out)) > 0
            batch = collate([layout(t, BK, Rule(policy), max_backtracks=4) for t in traces])
            with torch.no_grad():
                lp = action_logprobs(m, batch, T, k, p)
            rec = torch.tensor([x for o in out for x in o["logprobs"]])
            assert torch.isfinite(lp).all()
            assert (lp - rec).abs().max().item() < 1e-5


@pytest.mark.parametrize("slot_bans, max_retries", [(False, None), (True, 1), (False, 2), (True, 0)])
def test_ban_knob_and_retry_limit_agree_between_decoding_and_layout(slot_bans, max_retries):
    """Invariant 4 with the §4 knobs: sampling without slot bans (a rewind is a resample) and with a
    per-slot retry limit scores the same in the training layout; the limit holds in every sample."""
    for policy in ["keep", "rewind"]:
        m = tiny()
        with torch.no_grad():   # a model that backtracks often
            u = torch.nn.functional.normalize(torch.randn(32), dim=0)
            m.transformer.ln_f.bias.copy_(u)
            m.transformer.wte.weight[BK] = 3 * u
        prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]] * 2
        out = generate(m, prompts, max_new_tokens=40, rule=Rule(policy, slot_bans, max_retries), temperature=1.0,
                       seed=1)
        traces = [Trace(pr, o["response"]) for pr, o in zip(prompts, out)]
        n_bk = sum(o["response"].count(BK) for o in out)
        assert (n_bk == 0) == (max_retries == 0)
        lays = [layout(t, BK, Rule(policy, slot_bans, max_retries)) for t in traces]
        with torch.no_grad():
            lp = action_logprobs(m, collate(lays), 1.0)
        rec = torch.tensor([x for o in out for x in o["logprobs"]])
        assert torch.isfinite(lp).all() and (lp - rec).abs().max().item() < 1e-5
        for o in out:   # no stack depth is backtracked more than max_retries times in a row of its life
            stack, retries = [], {}
            for t in o["response"]:
                if t == BK and stack:
                    stack.pop()
                    retries.pop(len(stack) + 1, None)
                    retries[len(stack)] = retries.get(len(stack), 0) + 1
                    assert max_retries is None or retries[len(stack)] <= max_retries
                elif t != BK:
                    stack.append(t)
    # without slot bans a rewind is a resample: the deleted token may be written again at its slot
    # (the layout records bans whether or not the trace obeys them); the retry limit bans a second BK at depth 1
    L = layout(Trace([1], [5, 7, BK, 7, BK]), BK, Rule("rewind", slot_bans, max_retries))
    assert (7 in L["bans"][3]) == slot_bans
    assert (BK in L["bans"][4]) == (max_retries is not None and max_retries <= 1)


def test_greedy_rewind_without_slot_bans_needs_a_retry_limit():
    m = tiny()
    with pytest.raises(ValueError, match="retry limit"):
        generate(m, [[1, 2]], max_new_tokens=4, rule=Rule("rewind", slot_bans=False), temperature=0)
    out = generate(m, [[1, 2]], max_new_tokens=4, rule=Rule("rewind", False, 1), temperature=0)
    assert len(out[0]["response"]) > 0


def test_greedy_rewind_never_loops_and_cap_holds():
    m = tiny()
    with torch.no_grad():   # a model that wants to backtrack after every token
        u = torch.nn.functional.normalize(torch.randn(32), dim=0)
        m.transformer.ln_f.bias.copy_(u)
        m.transformer.wte.weight[BK] = 5 * u
    for cap in [None, 5]:
        out = generate(m, [[1, 2, 3], [9]], max_new_tokens=200, rule=Rule("rewind"), temperature=0,
                       max_backtracks=cap, stop_at_eot=False)
        for o in out:
            seen, stack = set(), []
            for t in o["response"]:       # a loop revisits a (state, action) pair
                key = (tuple(stack), t)
                assert key not in seen
                seen.add(key)
                stack = stack[:-1] if t == BK else stack + [t]
            if cap is not None:
                assert o["response"].count(BK) <= cap


def test_batched_generation_matches_one_by_one():
    m = tiny()
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8]]
    forced = [[10, BK, 11, 12, BK, BK, 13], [14, 15], [BK, 16, BK, 17, 18, 19, BK]]
    both = replay(m, prompts, forced, Rule("rewind"), return_logits=True)
    for i in range(3):
        one = replay(m, [prompts[i]], [forced[i]], Rule("rewind"), return_logits=True)
        assert torch.allclose(torch.stack(both[i]["logits"]), torch.stack(one[0]["logits"]), atol=1e-5)


@pytest.mark.parametrize("block_size", [96, 14])
@pytest.mark.parametrize("max_retries", [None, 1])
def test_batched_greedy_with_stops_and_bans_matches_one_by_one(block_size, max_retries):
    """Rows of several prompt lengths that backtrack, collect slot bans and end at different steps
    (at either of two stop ids, or at the cache's cap when block_size is 14) decode in one batch
    exactly as alone: a finished row must not disturb the others, and each output is its own."""
    m = tiny()
    m.config.block_size = block_size   # the same weights; 14 caps the cache (learned positions)
    with torch.no_grad():   # steer the final hidden state towards BK
        u = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(3)), dim=0)
        m.transformer.ln_f.bias.copy_(u)
        m.transformer.wte.weight[BK] = 2 * u
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    kw = dict(max_new_tokens=24, rule=Rule("rewind", max_retries=max_retries), temperature=0, max_backtracks=5,
              stop_ids=[EOT, 21])
    both = generate(m, prompts, **kw)
    assert sum(o["response"].count(BK) for o in both) > 0
    assert len({len(o["response"]) for o in both}) > 2   # the rows ended at different steps
    for p, o in zip(prompts, both):
        one = generate(m, [p], **kw)[0]
        assert o["response"] == one["response"] and o["resolved"] == one["resolved"]
        assert o["resolved"] == resolve(o["response"], BK)
        assert np.allclose(o["logprobs"], one["logprobs"], atol=1e-5)
        assert len(p) + len(o["resolved"]) <= block_size   # every token has a position below it


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_checkpoint_and_hf_export_round_trip(tmp_path, kind):
    m = tiny(kind)
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        ref = m(ids)
    m.save(str(tmp_path / "ck"), meta=dict(step=3))
    m.save(str(tmp_path / "ck"), meta=dict(step=4))   # overwrite goes through the atomic path
    m2 = GPT.from_pretrained(str(tmp_path / "ck"))
    assert m2.meta["step"] == 4 and m2.config == m.config
    m.export_hf(str(tmp_path / "hf"))
    m3 = GPT.from_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        assert torch.equal(m2(ids), ref)
        assert (m3(ids)[..., :V] - ref[..., :V]).abs().max().item() < 1e-6
    assert m3.config.bk_id == BK
    assert not os.path.exists(str(tmp_path / "ck") + ".tmp")


def test_tokenizers_special_tokens():
    for name in ["byte", "gpt2"]:
        tok = Tokenizer(name)
        ids = tok.encode("a <|BACKTRACK|> b <|endoftext|>")
        assert tok.bk_id not in ids and tok.eot_id not in ids   # user text is never special
        assert tok.decode(ids) == "a <|BACKTRACK|> b <|endoftext|>"
    g = Tokenizer("gpt2")
    assert g.eot_id == 50256 and g.bk_id == 50257 and g.encode("hello world") == [31373, 995]


@pytest.mark.parametrize("method", ["mean", "semantic", "description"])
def test_bk_embedding_init(method):
    tok = Tokenizer("byte")
    m = tiny(vocab_size=320, n_vocab=258, eot_id=256, bk_id=257)
    init_bk_embedding(m, tok, method=method, noise=False)
    W = m.transformer.wte.weight
    want = {"mean": W[:256].mean(0), "description": W[tok.encode("This token is used to delete the previous token in the response.")].mean(0)}
    if method in want:
        assert torch.allclose(W[257], want[method], atol=1e-6)
    init_bk_embedding(m, tok, method=method, noise=True)
    assert not torch.allclose(W[257], W[:256].mean(0))
    m2 = tiny("llama", vocab_size=320, n_vocab=258, eot_id=256, bk_id=257)
    init_bk_embedding(m2, tok, method=method)
    assert m2.lm_head.weight[257].abs().sum() > 0   # untied: the output row is set too


def test_sampler_never_picks_zero_probability_tokens():
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(64, 50), -1)
    lp[:, ::2] = float("-inf")
    lp = torch.log_softmax(lp, -1)
    from decode import sample
    draws = torch.stack([sample(lp, g) for _ in range(200)])
    assert (draws % 2 == 1).all()
    # frequencies follow the distribution (one row, many draws)
    row = lp[:1].expand(20000, -1)
    freq = torch.bincount(sample(row, g), minlength=50).float() / 20000
    assert (freq - lp[0].exp()).abs().max() < 0.02


def test_force_replays_more_actions_than_max_new_tokens():
    m = tiny(block_size=256)
    forced = [[1 + (i % 40) for i in range(150)]]
    out = replay(m, [[1, 2]], forced, Rule("keep"))   # however many actions: the cache is sized to hold them
    assert out[0]["response"] == forced[0]


def test_masked_banned_action_does_not_poison_the_loss():
    from model import sft_loss
    m = tiny()
    t = Trace([1, 2], [7, BK, 7, 8])     # under rewind, 7 is banned at the slot where it was deleted
    L = layout(t, BK, Rule("rewind"))
    assert 7 in L["bans"][2]
    L["weight"][2] = 0.0
    assert torch.isfinite(sft_loss(m, collate([L])))


def dense_reference_logprobs(m, batch, T, k, p):
    """The loss head as it was: a dense (A, V) ban matrix masked into the logits, then temperature,
    top-k, top-p, log_softmax and a gather. The sparse head must give the very same numbers."""
    logits = m.action_logits(batch).float()
    ban = torch.zeros(logits.shape, dtype=torch.bool)
    ban[:, m.config.n_vocab:] = True
    ban[batch.ban_act, batch.ban_tok] = True
    logits = logits.masked_fill(ban, float("-inf"))
    if T and T > 0:
        logits = logits / T
    if k and k < logits.shape[-1]:
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p < 1.0:
        srt, order = torch.sort(logits, dim=-1, descending=True)
        drop = srt.softmax(-1).cumsum(-1) - srt.softmax(-1) > p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.log_softmax(logits, -1).gather(1, batch.tgt.unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sparse_loss_head_equals_the_dense_one(kind):
    """The loss head writes only the banned entries (sparse bans, padding by a slice) and takes the
    fused cross-entropy path when no top-k/top-p applies: log-probs and gradients equal the dense
    computation's on random batches with bans, under temperature, top-k and top-p too."""
    from model import sft_loss
    rng = random.Random(3)
    for T, k, p in [(1.0, 0, 1.0), (0.7, 0, 1.0), (0, 0, 1.0), (0.7, 12, 0.9), (1.3, 0, 0.8), (1.0, 5, 1.0)]:
        m = tiny(kind)
        traces = [random_trace(rng, n_max=30, p_bk=0.4) for _ in range(6)]
        batch = collate([layout(t, BK, Rule(rng.choice(["keep", "rewind"])), max_backtracks=3) for t in traces])
        assert batch.ban_act.numel() > 0
        with torch.no_grad():
            want, got = dense_reference_logprobs(m, batch, T, k, p), action_logprobs(m, batch, T, k, p)
        assert torch.equal(want, got), (T, k, p)
    # gradients of the SFT loss, banned targets (log-prob -inf) carrying weight 0 as masked errors do
    for policy in ["keep", "rewind"]:
        m = tiny(kind)
        batch = collate([layout(random_trace(rng, n_max=30, p_bk=0.4), BK, Rule(policy), max_backtracks=3)
                         for _ in range(6)])
        banned = torch.zeros(batch.tgt.shape, dtype=torch.bool)
        banned[batch.ban_act[batch.ban_tok == batch.tgt[batch.ban_act]]] = True
        batch.weight = torch.where(banned, 0.0, batch.weight)
        grads = []
        for head in ("dense", "sparse"):
            m.zero_grad()
            if head == "sparse":
                loss = sft_loss(m, batch)
            else:
                lp, w = dense_reference_logprobs(m, batch, 1.0, 0, 1.0), batch.weight
                loss = torch.where(w > 0, -lp * w, torch.zeros_like(lp)).sum() / w.sum()
            loss.backward()
            grads.append([x.grad.clone() for x in m.parameters()])
        for a, b in zip(*grads):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def assert_decoded_logits_match_the_forward(model, prompts, max_new_tokens, atol=1e-5):
    """Greedy `keep` decoding of the prompts in one batch: each row's logits at every step equal
    a full forward over its prompt and response."""
    out = generate(model, prompts, max_new_tokens=max_new_tokens, rule=Rule("keep"), temperature=0,
                   stop_at_eot=False, return_logits=True)
    for p, o in zip(prompts, out):
        with torch.no_grad():
            full = model(torch.tensor([p + o["response"]]))[0, len(p) - 1:-1]
        assert torch.allclose(torch.stack(o["logits"]).float(), full.float(), atol=atol)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_cpu_decoding_follows_weight_updates(kind, rows):
    """Decoding on CPU reads copies of the linear weights kept for the model (decode.decode_weights:
    transposed for one row, packed for oneDNN for several where torch has it): after an in-place
    update, as an optimizer step makes, the copies are remade, and every row's decoded logits
    still equal the full forward's. The copies live beside the model, so it still deep-copies."""
    m = tiny(kind, **({"qkv_bias": True} if kind == "llama" else {}))   # linears with and without bias
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]][:rows]
    for _ in range(2):
        assert_decoded_logits_match_the_forward(m, prompts, max_new_tokens=5)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1.5)
    copy.deepcopy(m)


def test_cpu_decoding_weight_copies_follow_swapped_and_cast_weights():
    """The copies decoding reads are remade when a weight becomes another tensor without an
    in-place update (`.data =`, a dtype round trip), even if the new tensor lands at the old one's
    address; and decoding still works under CPU autocast and for weights made in inference mode."""
    m = tiny(n_embd=64, vocab_size=512)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]

    def check(model, atol=1e-5):
        for rows in (3, 1):
            assert_decoded_logits_match_the_forward(model, prompts[:rows], max_new_tokens=4, atol=atol)

    for i in range(8):
        check(m)
        with torch.no_grad():
            for p in m.parameters():
                p.data = -p.data if i % 2 else p.data * 1.25
        m.double()
        m.float()
    check(m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check(m, atol=0.1)
    with torch.inference_mode():
        m2 = tiny(n_embd=64, vocab_size=512, seed=1)
    check(m2)


def test_replay_keeps_every_action_and_the_timer_sees_every_phase():
    """replay() returns the given actions as the response, a BK on an empty response included; a
    timer passed to generate is entered around the prompts' forward once, the sampler once a step,
    and the model around each step's head and forward, and changes nothing the call returns."""
    m = tiny()
    prompts = [[1, 2, 3], [4], [5, 6]]
    forced = [[10, BK, 11], [BK, 12, 13, BK, BK], [14]]
    b = replay(m, prompts, forced, Rule("rewind"), return_logits=True)
    assert [o["response"] for o in b] == forced and [o["resolved"] for o in b] == [[11], [], [14]]
    spans = []

    class Timer:
        def __call__(self, phase):
            spans.append(phase)
            return self

        def __enter__(self):
            pass

        def __exit__(self, *exc):
            pass

    kw = dict(max_new_tokens=7, rule=Rule("rewind"), temperature=1.0, seed=3, stop_at_eot=False)
    timed = generate(m, prompts, timer=Timer(), **kw)
    assert timed == generate(m, prompts, **kw)
    assert spans[0] == "prefill" and spans.count("prefill") == 1
    assert spans.count("sampler") == 7 and 7 < spans.count("model") <= 14


def test_a_cached_forward_leaves_no_state_on_the_cache():
    """KVCache.begin returns what one forward needs (CacheWrite: positions, span, mask) rather than
    keeping it on the cache, and decoding's weight copies are passed, not carried by the cache."""
    from model import CacheWrite
    m = tiny()
    cache = KVCache(m.config, 2, 16)
    before = set(vars(cache))
    w = cache.begin(torch.tensor([[3], [3]]))
    assert isinstance(w, CacheWrite) and w.span == 4 and w.mask is None   # aligned rows: no mask
    w = cache.begin(torch.tensor([[3], [1]]))
    assert w.mask.shape == (2, 1, 1, 4) and w.mask[1, 0, 0].tolist() == [True, True, False, False]
    with torch.no_grad():
        m.hidden(torch.randint(0, EOT, (2, 5)), torch.arange(5).expand(2, 5), cache=cache)
    assert set(vars(cache)) == before and not {"pos", "span", "mask", "weights"} & before


def test_set_dropout_reaches_every_layer():
    from model import set_dropout
    m = tiny("llama", dropout=0.1)
    assert set_dropout(m, 0.3) is m and m.config.dropout == 0.3
    layers = [x for x in m.modules() if hasattr(x, "dropout")]
    assert len(layers) == 2 * m.config.n_layer and all(x.dropout == 0.3 for x in layers)
    set_dropout(m, 0.0)
    assert m.config.dropout == 0.0 and all(x.dropout == 0.0 for x in layers)


def test_replay_scores_like_the_layout_when_bks_delete_nothing():
    """A BK on an empty response deletes nothing (sampling never draws one: it is banned there), yet
    counts as a BK the row emitted. However many of them a given trace holds, replay's log-prob of
    every later action is the training layout's: no slot ban is pushed out of its slot."""
    m = tiny()
    for resp in ([BK] * 6 + [5, BK, 6, BK, 7], [BK, BK, 5, BK, 6, BK, 8, BK, 9, BK, 10]):
        t = Trace([1, 2], resp)
        for rule in (Rule("rewind"), Rule("rewind", max_retries=1), Rule("keep")):
            want = action_logprobs(m, collate([layout(t, BK, rule, mask_errors=False)]))
            got = torch.tensor(replay(m, [t.prompt], [t.response], rule)[0]["logprobs"])
            finite = torch.isfinite(want)
            assert torch.equal(finite, torch.isfinite(got)), (resp, rule)
            assert torch.allclose(got[finite], want[finite], atol=1e-5), (resp, rule)
