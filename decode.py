"""
Generation with in-place rewinds: many rows in one KV cache, each row's backtracks applied to its
cache as they are sampled (docs/backtrack-semantics.md §3-§4). The same bans as data.layout's, so
what a model was trained on and how it is decoded never differ.
"""
import functools
import weakref

import torch
import torch.nn as nn

from data import resolve
from model import KVCache, linear, shape_logits


def sample(logprobs, gen):
    """One draw per row by inverting the CDF with u in (0, 1]: a token of zero probability is
    never picked (the first index whose CDF reaches u has mass), and it is much cheaper than
    torch.multinomial at a large vocabulary on CPU."""
    cdf = logprobs.exp().cumsum(-1)
    u = (1.0 - torch.rand(cdf.shape[0], 1, generator=gen, device=cdf.device)) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp(max=cdf.shape[1] - 1)


@functools.cache
def onednn_packing():
    """Whether this torch can pack a linear weight for oneDNN and multiply by it (x86 builds with
    oneDNN). These are the ops torch.compile's CPU weight prepacking emits; they are private, so
    they are tried once on a tiny weight rather than assumed from the version or platform."""
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2), 1)
        return bool(torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), w, None, "none", [], "").eq(2).all())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


# model -> {nn.Linear: (the weight its copy was made from, its version, the copy)}; kept beside the
# model rather than on it, so that copy.deepcopy and pickling a model still work (packed weights
# cannot be copied)
_copies = weakref.WeakKeyDictionary()


def decode_weights(model, rows):
    """{nn.Linear: the copy of its weight that CPU decoding of `rows` rows reads}.

    Decoding multiplies a few rows by each weight, where MKL's matrix product (what nn.Linear
    calls) reaches half this CPU's peak. Measured at GPT-2 small, one thread, fp32, weights cold in
    cache as in decoding:
    - several rows: oneDNN's product on a weight packed for it once is 1.5-2x faster (16 rows: 80
      vs 49 GFLOP/s for c_attn, 15 vs 33 ms for the 50304-row head; 64 rows: 1.3-1.6x), so every
      linear gets a packed copy where torch has oneDNN (fp32 and no autocast, which would hand
      the packed fp32 weight bf16 inputs; see onednn_packing);
    - one row: MKL reads nn.Linear's (out, in) weight slower than the (in, out) layout, the more so
      the wider the layer (c_attn and c_fc 1.3-1.7x, the head 1.9x), while the packed product
      gains only on narrow layers and adds ~10 us a call, which small models feel; so the layers
      wider than deep get a copy stored transposed instead. Without oneDNN, up to 16 rows, only
      the much wider ones (out / in > 16: the head, 1.18x at 16 rows) do.
    The copies take as much memory again as those weights and 0.3 s to make at GPT-2 small, so
    they are kept while the model lives, and a copy is remade only when its weight changed: a
    different tensor (the one a copy was made from is held, so no new weight can take its
    address), or a new version, which every in-place update such as an optimizer step or a load
    bumps. Copies this call does not use are dropped, and so is everything once the model leaves
    the CPU."""
    old, new = _copies.pop(model, {}), {}
    p = next(model.parameters())
    if p.device.type != "cpu":
        return new
    pack = rows > 1 and p.dtype == torch.float32 and not torch.is_autocast_enabled("cpu") and onednn_packing()
    for m in model.modules():
        if not isinstance(m, nn.Linear) or type(m.weight.data) is not torch.Tensor:
            continue   # (a weight that is a shard, FSDP's DTensor, is read as it is)
        if not (pack or rows <= 16 and m.out_features > m.in_features * (1 if rows == 1 else 16)):
            continue
        w = m.weight.detach()   # shares the weight's storage and version counter
        version = (None if w.is_inference() else w._version, pack)   # an inference tensor has no counter
        entry = old.pop(m, None)
        if entry is None or entry[0].data_ptr() != w.data_ptr() or entry[1] != version:
            entry = None   # free the old copy before making the new one
            entry = (w, version, torch.ops.mkldnn._reorder_linear_weight(w, rows) if pack else w.t().contiguous().t())
        new[m] = entry
    _copies[model] = new
    return {m: e[2] for m, e in new.items()}


def greedy_decodable(policy="rewind", slot_bans=True, max_retries=None):
    """Whether greedy decoding is defined under a decoding rule (data.as_rule's keys): under `rewind`
    a rewound state equals an earlier one, so greedy would loop without slot bans or a retry limit
    (docs/backtrack-semantics.md §4). Without them only sampling is defined (a backtrack is then a
    resample)."""
    return policy != "rewind" or slot_bans or max_retries is not None


# inference_mode, not no_grad: the many small tensors of a step carry no version counter or view
# tracking, which makes each tensor call cheaper (the bookkeeping's share of a 64-row rollout step
# fell from ~2.8% to ~2.4% on CPU). What comes back is plain lists, and with return_logits
# tensors that cannot enter autograd.
@torch.inference_mode()
def generate(model, prompts, max_new_tokens=128, policy="rewind", temperature=1.0, top_k=0, top_p=1.0,
             max_backtracks=None, seed=None, stop_at_eot=True, on_step=None, force=None, return_logits=False,
             device=None, slot_bans=True, max_retries=None, stop_ids=None, pop_below=0.0, trigger=0.0,
             return_verifier=False):
    """Sample a response for each prompt (list of id lists), all rows in one cache.

    policy 'keep': BK is appended like any token. policy 'rewind': BK frees the top slot in place
    (the row's cache length drops by one, as in KVCache.pop) and is not written; the slot below acts
    again from its stored hidden state. Bans
    (docs/backtrack-semantics.md §4, the same rules as data.layout): BK while the response is
    empty, BK once max_backtracks are spent, BK on a slot already backtracked max_retries times,
    and under 'rewind' with slot_bans every token deleted at a slot, there. A row whose every
    token is banned ends. Rows end at any of stop_ids (default: end-of-text, unless stop_at_eot
    is False). Returns, per row, dict(response=raw actions incl. BK, logprobs=log-prob of each
    action under the sampled distribution, resolved=ids).
    on_step(row, token, popped_token_or_None) is called for each action (for streaming).
    force: per row, a list of actions to replay instead of sampling (tests, scoring); a row
    ends when its list does. return_logits: also return each action's raw logits.
    pop_below: a search's way out (an evaluation-time rule; training never sees it): where the
    tokens still allowed, BK aside, hold less than this share of the model's own (unbanned)
    distribution, i.e. every value it likes is banned at this slot, the action is BK (when BK is
    allowed). Its log-prob is BK's under the banned distribution. 0 = off.
    trigger: with a verifier head (model.add_verifier), the action is BK wherever the head's
    probability that the last surviving token is wrong exceeds trigger and BK is allowed (the same
    bans and caps); its log-prob is BK's under the banned distribution, as for pop_below. 0 = off.
    return_verifier: also return, per row, `verifier`: that probability at each action (the head is
    computed only when a trigger or this asks for it).

    The bookkeeping (stacks, bans, retry counts, caps, finished rows) lives in tensors and is
    updated for all rows at once: no per-row Python and no per-row device sync in the loop.
    """
    if policy not in ("keep", "rewind"):
        raise ValueError(f"unknown policy {policy!r}: expected 'keep' or 'rewind'")
    verifier = getattr(model, "verifier", None) if trigger > 0 or return_verifier else None
    if (trigger > 0 or return_verifier) and verifier is None:
        raise ValueError("trigger and return_verifier need a model with a verifier head "
                         "(train_sft.py --verifier_weight > 0)")
    if not greedy_decodable(policy, slot_bans, max_retries) and not (temperature and temperature > 0) and force is None:
        raise ValueError("greedy `rewind` decoding needs slot bans or a retry limit: a rewound state equals an "
                         "earlier one, so greedy decoding would loop (docs/backtrack-semantics.md §4)")
    cfg = model.config
    device = device or next(model.parameters()).device
    B = len(prompts)
    bk = cfg.bk_id
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    if force is not None:   # replaying: the cache must hold every forced action
        max_new_tokens = max(len(f) for f in force)
        forced = torch.zeros(B, max(max_new_tokens, 1), dtype=torch.long)
        for b, f in enumerate(force):
            forced[b, :len(f)] = torch.tensor(f, dtype=torch.long)
        forced, force_len = forced.to(device), torch.tensor([len(f) for f in force], device=device)
    stops = torch.tensor(list(stop_ids) if stop_ids is not None else [cfg.eot_id] if stop_at_eot else [],
                         dtype=torch.long, device=device)
    stop = int(stops[0]) if len(stops) == 1 else None   # one stop id: compared as a Python int
    stops = stops if len(stops) > 1 else None
    plen = torch.tensor([len(p) for p in prompts], device=device)
    Tp = int(plen.max())
    max_len = Tp + max_new_tokens + 1
    if cfg.pos == "learned" and max_len > cfg.block_size:
        max_len = cfg.block_size
    dtype = next(model.parameters()).dtype
    cache = KVCache(cfg, B, max_len, device=device, dtype=dtype)
    cache.weights = decode_weights(model, B)   # on CPU, copies of the weights read faster in decoding
    idx = torch.zeros(B, Tp, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = torch.tensor(p, device=device)
    model.hidden(idx, torch.arange(Tp, device=device).expand(B, Tp), cache=cache)
    cache.lengths.copy_(plen)

    # The bookkeeping tables are indexed by position, like the cache: a row's surviving response
    # sits at positions plen..top-1, and top is where its next token goes. stack[top] (its free
    # slot) holds V, "no token", and deleted[j] and ban_tok[j] (the retry count and the bans at
    # position j) are empty for every j > top. So the updates below can be applied to every row
    # unmasked: for a row that did not pop they bank V at its free slot, add 0 and clear what is
    # already clear. A finished row goes on like a live one; only its actions are discarded (and
    # its output is resolved from the actions it kept). top reaches Tp + max_new_tokens at most and
    # one position above it is touched: W = Tp + max_new_tokens + 2.
    W = Tp + max_new_tokens + 2
    # the pops a row can make: each deletes a token written before it, so at most half the steps
    pops = max_new_tokens // 2 if max_backtracks is None else min(max_backtracks, max_new_tokens // 2)
    K = max(1, pops if max_retries is None else min(max_retries, pops))   # slot bans a position can hold
    V, NV = cfg.vocab_size, cfg.n_vocab
    rewind = policy == "rewind"
    slot_banning = rewind and slot_bans
    inf = float("inf")
    rows = torch.arange(B, device=device)
    top = plen.clone()
    stack = torch.full((B, W), V, dtype=torch.long, device=device)   # surviving response tokens
    spent = torch.zeros(B, dtype=torch.long, device=device)          # BKs emitted
    # position -> tokens deleted there since the token below it was written: the retry count (§4)
    deleted = torch.zeros(B, W, dtype=torch.long, device=device)
    # position -> banned tokens (V: none). Slots 0..K-1 take the slot bans under `rewind`: a ban's
    # slot is a count that only grows, so no two bans at a position share one (the BKs the row
    # emitted before it, or with a retry limit the position's retry count); a row that does not
    # pop banks V at the slot its count points to, never used yet, which is slot K when that count
    # reached K. The last slot bans BK at the response's first position, for good (§4).
    S = K + 2 if slot_banning else 1
    ban_tok = torch.full((B, W, S), V, dtype=torch.long, device=device)
    ban_tok[rows, plen, S - 1] = bk
    deleted_up, ban_up = deleted[:, 1:], ban_tok[:, 1:]   # views: indexed at d, they reach position d + 1
    live = force_len > 0 if force is not None else torch.ones(B, dtype=torch.bool, device=device)
    actions, logprobs, alive, kept_logits, verdicts = [], [], [], [], []
    # The bans are written as -inf straight into a float copy of the logits, entry by entry (no
    # (B, V) ban matrix). Column V is a spare that unused ban slots point at; it and the padding
    # columns (ids >= n_vocab) are set to -inf once, and each step copies in only the real ones.
    banned = torch.full((B, V + 1), -inf, device=device)
    # The sampler reads all of it, the spare column too (probability 0): a contiguous tensor, which
    # log_softmax and the draw take as it is (a (B, V) view of it would be copied first).
    real, bk_col, col0 = banned[:, :NV], banned[:, bk], banned[:, 0]   # views, made once
    # Work skipped where it can make no difference (a step of a small model is bound by the number
    # of tensor calls): a row can have every token banned only if its slot bans (at most K) and BK
    # cover all n_vocab tokens, and a row can outgrow the cache only when block_size capped max_len.
    can_stick = slot_banning and K + 1 >= NV
    capped = max_len < Tp + max_new_tokens + 1
    pos = cache.lengths.unsqueeze(1)   # a view: the slot each row's action of this step is written to
    for step in range(max_new_tokens):
        # the hidden state of each row's last token, read at its cache length: under `rewind` the
        # cache holds the prompt and the surviving tokens, at the same positions as the tables (so
        # a pop is top's decrement, §3); under `keep` the prompt and every action
        length = top if rewind else plen + step
        if capped:   # (a row that finished at the cap goes on from its last slot)
            length = length.clamp(max=max_len)
        h = cache.h[rows, length]
        logits = linear(model.lm_head, h, cache)   # (B, V)
        real.copy_(logits[:, :NV])
        banned.scatter_(1, ban_tok[rows, top], -inf)
        # BK is also banned once max_backtracks are spent, and on a token already deleted and
        # rewritten max_retries times
        no_bk = spent >= max_backtracks if max_backtracks is not None else None
        if max_retries is not None:
            tired = deleted[rows, top - 1] >= max_retries
            no_bk = tired if no_bk is None else no_bk | tired
        if no_bk is not None:
            bk_col.masked_fill_(no_bk, -inf)
        if can_stick:
            # a row whose every token is banned has tried and deleted everything at this slot: it
            # ends (the logits themselves are finite, so only bans put every entry at -inf). Its
            # sample is discarded; token 0 is unbanned only to keep its distribution defined.
            stuck = torch.isneginf(banned.amax(-1))
            live = live > stuck
            col0.masked_fill_(stuck, 0.0)
        if pop_below > 0 and force is None:   # computed before shape_logits, which may write into banned
            liked = logits[:, :NV].float().softmax(-1).masked_fill(torch.isneginf(real), 0.0)
            out_of_values = (liked.sum(-1) - liked[:, bk] < pop_below) & ~torch.isneginf(bk_col)
        if verifier is not None:   # the head reads the hidden state the next token's logits come from
            p_wrong = torch.sigmoid(linear(verifier, h, cache).squeeze(-1).float())
            if return_verifier:
                verdicts.append(p_wrong)
            if trigger > 0 and force is None:
                fire = (p_wrong > trigger) & ~torch.isneginf(bk_col)
        lp = shape_logits(banned, temperature, top_k, top_p)
        if force is not None:
            nxt = forced[:, step] if step < forced.shape[1] else torch.zeros_like(top)
        elif temperature and temperature > 0:
            nxt = sample(lp, gen)
        else:
            nxt = lp.argmax(-1)
        if pop_below > 0 and force is None:
            nxt = torch.where(out_of_values, bk, nxt)
        if trigger > 0 and force is None:
            nxt = torch.where(fire, bk, nxt)
        actions.append(nxt); logprobs.append(lp[rows, nxt]); alive.append(live)
        if return_logits:
            kept_logits.append(logits)
        is_bk = nxt == bk
        # a sampled or greedy BK on an empty response has probability 0 (banned above); a forced one
        # is kept as an action and deletes nothing
        pop = is_bk & (top > plen) if force is not None else is_bk
        push = ~is_bk
        if on_step is not None:   # streaming reads each row's action: one sync, only when asked
            gone = stack[rows, top - 1]
            for b in live.nonzero().flatten().tolist():
                on_step(b, int(nxt[b]), int(gone[b]) if pop[b] else None)
        # a pop from top d+1 to d: the popped token's own retry count and bans go with it; the
        # token is banned at position d (rewind) and position d counts one more retry. Under
        # `rewind` d is also where this step's action is written: a push's token, or a popped row's
        # dummy in the slot it freed (alpha=-1: a bool can be added, not subtracted)
        if rewind:
            d = torch.add(top, pop, alpha=-1, out=cache.lengths)
        else:
            d = top.add(pop, alpha=-1)
            torch.add(plen, step, out=cache.lengths)
        if max_retries is not None:
            deleted_up[rows, d] = 0
            slot = deleted[rows, d]   # <= K, and < K for a row that pops (a forced replay may ignore the caps)
            deleted[rows, d] = slot + pop
        else:
            slot = spent
        if slot_banning:
            ban_up[rows, d] = V
            if force is not None:
                slot = torch.where(pop, slot.clamp(max=K - 1), K)
            ban_tok[rows, d, slot] = stack[rows, d]
        spent.add_(pop if force is None else is_bk)
        stack[rows, d] = torch.where(push, nxt, V)   # a push writes its token; a pop frees the slot
        top = d + push
        write = push if rewind else live
        if force is not None:
            ended = step + 1 >= force_len
        elif stop is not None:
            ended = nxt == stop
        else:   # no stop id, or several
            ended = torch.isin(nxt, stops) if stops is not None else None
        if capped:   # (d, an alias of cache.lengths, is not used past here)
            cache.lengths.clamp_(max=max_len - 1)
            full = cache.lengths + write >= max_len
            ended = full if ended is None else ended | full
        if ended is not None:
            live = live > ended   # live and not ended (a row already done stays so)
        if ended is not None or can_stick:   # else every row is live
            write = write & live
        if not bool(write.any()):   # one host read per step
            if not bool(live.any()):
                break
            continue   # every live row rewound: nothing to write, the next logits are in cache.h already
        # one batched forward; rows that rewound or finished write a dummy, where nothing attends
        model.hidden(nxt.unsqueeze(1), pos, cache=cache)
    # one transfer of everything recorded, then per-row lists
    A = torch.stack(actions, 1).tolist() if actions else [[] for _ in range(B)]
    L = torch.stack(logprobs, 1).tolist() if actions else [[] for _ in range(B)]
    M = torch.stack(alive, 1).tolist() if actions else [[] for _ in range(B)]
    P = torch.stack(verdicts, 1).tolist() if verdicts else None
    out = []
    for b in range(B):
        keep = [i for i, a in enumerate(M[b]) if a]
        response = [A[b][i] for i in keep]
        o = dict(response=response, logprobs=[L[b][i] for i in keep], resolved=resolve(response, bk))
        o["logits"] = [kept_logits[i][b] for i in keep] if return_logits else []
        if P is not None:
            o["verifier"] = [P[b][i] for i in keep]
        out.append(o)
    return out
