"""
Generation with in-place rewinds: many rows in one KV cache, each row's backtracks applied to its
cache as they are sampled (docs/backtrack-semantics.md §3-§4). The same bans as data.layout's, so
what a model was trained on and how it is decoded never differ.
"""
import torch
import torch.nn as nn

from model import KVCache, linear, shape_logits


def sample(logprobs, gen):
    """One draw per row by inverting the CDF with u in (0, 1]: a token of zero probability is
    never picked (the first index whose CDF reaches u has mass), and it is much cheaper than
    torch.multinomial at a large vocabulary on CPU."""
    cdf = logprobs.exp().cumsum(-1)
    u = (1.0 - torch.rand(cdf.shape[0], 1, generator=gen, device=cdf.device)) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp(max=cdf.shape[1] - 1)


def transposed_weights(model, rows):
    """{nn.Linear: its weight, as a view of a copy stored transposed}, for decoding `rows` <= 16
    rows on CPU, where each linear is a matrix-vector product or nearly.

    There MKL reads nn.Linear's (out, in) weight slower than the (in, out) layout Hugging Face's
    GPT-2 Conv1D keeps, the more so the wider the layer (outputs / inputs) and the fewer the rows;
    measured at GPT-2 small, weights cold in cache as in decoding: one row, 1/1.6 the speed for
    c_attn and c_fc (3x and 4x wide) and 1/1.7 for the 50304-row head (65x), while the narrow MLP
    c_proj is 1.1x faster as it is (38 vs 27 ms a token for all matrix products together); 16
    rows, only the head gains (1.18x; c_fc is then 1.1x slower transposed). So one row copies
    every wide layer and 16 rows the much wider ones (the head), by out / in > 1 or > 16.
    The copies take as much memory again as those weights and ~0.4 s to make at GPT-2 small,
    so they are kept on the model and a copy is remade only when its weight changed (its storage,
    or its version, which every in-place update such as an optimizer step or a load bumps)."""
    memo = model.__dict__.setdefault("_transposed", {})
    out = {}
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.out_features > m.in_features * (1 if rows == 1 else 16):
            w = m.weight
            key = (w.data_ptr(), w._version, w.dtype)
            if m not in memo or memo[m][0] != key:
                memo[m] = (key, w.detach().t().contiguous().t())   # same shape, (in, out) storage
            out[m] = memo[m][1]
    return out


def greedy_decodable(policy="rewind", slot_bans=True, max_retries=None):
    """Whether greedy decoding is defined under a decoding rule (data.as_rule's keys): under `rewind`
    a rewound state equals an earlier one, so greedy would loop without slot bans or a retry limit
    (docs/backtrack-semantics.md §4). Without them only sampling is defined (a backtrack is then a
    resample)."""
    return policy != "rewind" or slot_bans or max_retries is not None


@torch.no_grad()
def generate(model, prompts, max_new_tokens=128, policy="rewind", temperature=1.0, top_k=0, top_p=1.0,
             max_backtracks=None, seed=None, stop_at_eot=True, on_step=None, force=None, return_logits=False,
             device=None, slot_bans=True, max_retries=None, stop_ids=None):
    """Sample a response for each prompt (list of id lists), all rows in one cache.

    policy 'keep': BK is appended like any token. policy 'rewind': BK frees the top slot in place
    (KVCache.pop) and is not written; the slot below acts again from its stored hidden state. Bans
    (docs/backtrack-semantics.md §4, the same rules as data.layout): BK while the response is
    empty, BK once max_backtracks are spent, BK on a slot already backtracked max_retries times,
    and under 'rewind' with slot_bans every token deleted at a slot, there. A row whose every
    token is banned ends. Rows end at any of stop_ids (default: end-of-text, unless stop_at_eot
    is False). Returns, per row, dict(response=raw actions incl. BK, logprobs=log-prob of each
    action under the sampled distribution, resolved=ids).
    on_step(row, token, popped_token_or_None) is called for each action (for streaming).
    force: per row, a list of actions to replay instead of sampling (tests, scoring); a row
    ends when its list does. return_logits: also return each action's raw logits.

    The bookkeeping (stacks, bans, retry counts, caps, finished rows) lives in tensors and is
    updated for all rows at once: no per-row Python and no per-row device sync in the loop.
    """
    if policy not in ("keep", "rewind"):
        raise ValueError(f"unknown policy {policy!r}: expected 'keep' or 'rewind'")
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
    plen = torch.tensor([len(p) for p in prompts], device=device)
    Tp = int(plen.max())
    max_len = Tp + max_new_tokens + 1
    if cfg.pos == "learned" and max_len > cfg.block_size:
        max_len = cfg.block_size
    dtype = next(model.parameters()).dtype
    cache = KVCache(cfg, B, max_len, device=device, dtype=dtype)
    if B <= 16 and torch.device(device).type == "cpu":   # matrix-vector-like products: see transposed_weights
        cache.wt = transposed_weights(model, B)
    idx = torch.zeros(B, Tp, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = torch.tensor(p, device=device)
    model.hidden(idx, torch.arange(Tp, device=device).expand(B, Tp), cache=cache)
    cache.lengths.copy_(plen)

    # Depths 0..max_new_tokens can be reached, but a step reads only depths below max_new_tokens:
    # depths D - 2 and D - 1 are spares that rows with nothing to record write to, so each update
    # is one unconditional index_put instead of a read, a where and a write.
    D = max_new_tokens + 2
    K = max(1, min(x for x in (max_retries, max_backtracks, max_new_tokens) if x is not None))
    V, NV = cfg.vocab_size, cfg.n_vocab
    slot_banning = policy == "rewind" and slot_bans
    rows = torch.arange(B, device=device)
    stack = torch.zeros(B, D, dtype=torch.long, device=device)       # surviving response tokens, by depth
    depth = torch.zeros(B, dtype=torch.long, device=device)          # how many survive
    bk_left = torch.full((B,), max_backtracks if max_backtracks is not None else 0, dtype=torch.long, device=device)
    # depth -> tokens deleted there since the token below it was written: the retry count (§4),
    # and under `rewind` the slot of ban_tok the next ban there goes to
    deleted = torch.zeros(B, D, dtype=torch.long, device=device)
    ban_tok = torch.full((B, D, K), V, dtype=torch.long, device=device)  # rewind: tokens deleted at each depth (V: none)
    done = force_len == 0 if force is not None else torch.zeros(B, dtype=torch.bool, device=device)
    actions, logprobs, alive, kept_logits = [], [], [], []
    # The bans are written as -inf straight into a float copy of the logits, entry by entry (no
    # (B, V) ban matrix). Column V is a spare that unused ban slots point at; it and the padding
    # columns (ids >= n_vocab) are set to -inf once, and each step copies in only the real ones.
    banned = torch.full((B, V + 1), float("-inf"), device=device)
    real, lg, bk_col, col0 = banned[:, :NV], banned[:, :V], banned[:, bk], banned[:, 0]   # views, made once
    # Work skipped where it can make no difference (a step of a small model is bound by the number
    # of tensor calls): a row can have every token banned only if its slot bans (at most K) and BK
    # cover all n_vocab tokens, and a row can outgrow the cache only when block_size capped max_len.
    can_stick = slot_banning and K + 1 >= NV
    capped = max_len < Tp + max_new_tokens + 1
    top = cache.lengths.unsqueeze(1)   # a view: the position each row writes next, as lengths move
    for step in range(max_new_tokens):
        logits = linear(model.lm_head, cache.h[rows, cache.lengths - 1], cache)   # (B, V)
        real.copy_(logits[:, :NV])
        if slot_banning:
            banned.scatter_(1, ban_tok[rows, depth], float("-inf"))
        # BK is banned at depth 0 and once max_backtracks are spent: min(depth, BKs left) <= 0
        no_bk = (depth == 0) if max_backtracks is None else torch.minimum(depth, bk_left) <= 0
        if max_retries is not None:
            no_bk |= (depth > 0) & (deleted[rows, (depth - 1).clamp(min=0)] >= max_retries)
        bk_col.masked_fill_(no_bk, float("-inf"))
        if can_stick:
            # a row whose every token is banned has tried and deleted everything at this slot: it
            # ends (the logits themselves are finite, so only bans put every entry at -inf). Its
            # sample is discarded; token 0 is unbanned only to keep its distribution defined.
            stuck = torch.isneginf(lg.amax(-1))
            done = done | stuck
            col0.masked_fill_(stuck, 0.0)
        lp = shape_logits(lg, temperature, top_k, top_p)
        if force is not None:
            nxt = forced[:, step] if step < forced.shape[1] else torch.zeros_like(depth)
        elif temperature and temperature > 0:
            nxt = sample(lp, gen)
        else:
            nxt = lp.argmax(-1)
        live = ~done
        actions.append(nxt); logprobs.append(lp.gather(1, nxt.unsqueeze(1)).squeeze(1)); alive.append(live)
        if return_logits:
            kept_logits.append(logits)
        is_bk = live & (nxt == bk)
        # a sampled or greedy BK at depth 0 has probability 0 (banned above); only a forced one can
        pop = is_bk & (depth > 0) if force is not None else is_bk
        push = live ^ is_bk   # live and not BK
        if on_step is not None:   # streaming reads each row's action: one sync, only when asked
            gone = stack[rows, (depth - 1).clamp(min=0)]
            for b in live.nonzero().flatten().tolist():
                on_step(b, int(nxt[b]), int(gone[b]) if pop[b] else None)
        # a pop from depth d+1 to d: the popped token's own retry count and bans go with it; the
        # token is banned at depth d (rewind) and depth d counts one more retry
        popped = pop.long()
        d = depth - popped
        if max_retries is not None or slot_banning:
            at = torch.where(pop, d, D - 2)   # rows that do not pop write depths D - 2 and D - 1, never read
            above = at + 1
            deleted[rows, above] = 0
            if slot_banning:
                ban_tok[rows, above] = V
                n_del = deleted[rows, at]   # < K unless a forced replay ignored the caps
                ban_tok[rows, at, n_del if force is None else n_del.clamp(max=K - 1)] = stack[rows, d]
            deleted.index_put_((rows, at), popped, accumulate=True)
        if max_backtracks is not None:
            bk_left -= is_bk.long()
        stack[rows, torch.where(push, depth, D - 1)] = nxt
        depth = d + push
        write = push if policy == "rewind" else live
        if policy == "rewind":
            cache.lengths -= popped   # KVCache.pop, every row at once
        if force is not None:
            ended = step + 1 >= force_len
        else:
            ended = nxt == stop if stop is not None else torch.isin(nxt, stops)
        if capped:
            ended = ended | (cache.lengths + write >= max_len)
        done = done | ended   # (a row already done stays so, whatever its discarded action)
        write = write > ended   # write and not ended, in one op
        if not bool(write.any()):   # one host read per step
            if bool(done.all()):
                break
            continue   # every live row rewound: nothing to write, the next logits are in cache.h already
        # one batched forward; rows that rewound or finished write their action (a dummy) past
        # their length, a slot nothing attends to, and do not advance. lengths < max_len holds: a
        # row that would reach it finished above.
        model.hidden(nxt.unsqueeze(1), top, cache=cache)
        cache.lengths += write
    # one transfer of everything recorded, then per-row lists
    A = torch.stack(actions, 1).tolist() if actions else [[] for _ in range(B)]
    L = torch.stack(logprobs, 1).tolist() if actions else [[] for _ in range(B)]
    M = torch.stack(alive, 1).tolist() if actions else [[] for _ in range(B)]
    S, n = stack.tolist(), depth.tolist()
    out = []
    for b in range(B):
        keep = [i for i, a in enumerate(M[b]) if a]
        o = dict(response=[A[b][i] for i in keep], logprobs=[L[b][i] for i in keep], resolved=S[b][:n[b]])
        o["logits"] = [kept_logits[i][b] for i in keep] if return_logits else []
        out.append(o)
    return out
