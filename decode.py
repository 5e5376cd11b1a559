"""
Generation with in-place rewinds: many rows in one KV cache, each row's backtracks applied to its
cache as they are sampled (docs/backtrack-semantics.md §3-§4). The same bans as data.layout's, so
what a model was trained on and how it is decoded never differ.

generate() samples and replay() feeds given actions (tests, scoring); both run a Decoder, whose
step reads the head at each row's top, bans, chooses the action, applies its pop or push to the
row's bookkeeping, and advances (ends rows, writes the pushes into the cache in one forward).
"""
import contextlib
import functools
import weakref

import torch
import torch.nn as nn

from data import Rule, resolve
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


def verifier_head(model, wanted):
    """The model's verifier head where a trigger or return_verifier asks for it (else None)."""
    if not wanted:
        return None
    head = getattr(model, "verifier", None)
    if head is None:
        raise ValueError("trigger and return_verifier need a model with a verifier head "
                         "(train_sft.py --verifier_weight > 0)")
    return head


_UNTIMED = contextlib.nullcontext()


def untimed(phase):
    """The timer a decoder uses when none is given (see generate's `timer`): it times nothing."""
    return _UNTIMED

# -----------------------------------------------------------------------------
# the decoder: one KV cache and every row's bookkeeping, in tensors


class Decoder:
    """Many rows decoded in one KV cache. The bookkeeping (stacks, bans, retry counts, caps,
    finished rows) lives in tensors and is updated for all rows at once: no per-row Python and no
    per-row device sync in the loop. run() is the step loop; how an action is chosen, and when a
    row ends, is a subclass's: Sampling (generate) or Replay (replay).

    The bookkeeping tables are indexed by position, like the cache: a row's surviving response
    sits at positions plen..top-1, and top is where its next token goes. stack[top] (its free
    slot) holds V, "no token", and deleted[j] and ban_tok[j] (the retry count and the bans at
    position j) are empty for every j > top. So the updates of apply() can be made to every row
    unmasked: for a row that did not pop they bank V at its free slot, add 0 and clear what is
    already clear. A finished row goes on like a live one; only its actions are discarded (and
    its output is resolved from the actions it kept)."""

    def __init__(self, model, prompts, steps, *, rule, max_backtracks, temperature, top_k, top_p, verifier=None,
                 on_step=None, return_logits=False, return_verifier=False, device=None, timer=None, ban_slots=None):
        cfg = model.config
        self.model, self.verifier, self.timer = model, verifier, timer or untimed
        self.on_step, self.return_logits, self.return_verifier = on_step, return_logits, return_verifier
        self.sampling = (temperature, top_k, top_p)   # shape_logits' settings
        self.steps, self.rewind = steps, rule.policy == "rewind"
        self.max_backtracks, self.max_retries = max_backtracks, rule.max_retries
        self.bk, self.V, self.NV = cfg.bk_id, cfg.vocab_size, cfg.n_vocab
        self.device = device = device or next(model.parameters()).device
        B = len(prompts)
        self.rows = torch.arange(B, device=device)
        self.plen = torch.tensor([len(p) for p in prompts], device=device)
        Tp = int(self.plen.max())
        self.max_len = Tp + steps + 1
        if cfg.pos == "learned" and self.max_len > cfg.block_size:
            self.max_len = cfg.block_size
        # (a row can outgrow the cache only when block_size capped max_len)
        self.capped = self.max_len < Tp + steps + 1
        self.cache = KVCache(cfg, B, self.max_len, device=device, dtype=next(model.parameters()).dtype)
        # on CPU, copies of the weights that read faster in decoding, handed to every forward
        self.weights = decode_weights(model, B)
        self.prefill(prompts, Tp)

        # top reaches Tp + steps at most and one position above it is touched
        W = Tp + steps + 2
        # the pops a row can make: each deletes a token written before it, so at most half the steps
        pops = steps // 2 if max_backtracks is None else min(max_backtracks, steps // 2)
        # the slot bans a position can hold (ban_slots: a replay's own bound, see Replay)
        self.K = K = ban_slots or max(1, pops if rule.max_retries is None else min(rule.max_retries, pops))
        self.slot_banning = self.rewind and rule.slot_bans
        self.top = self.plen.clone()
        self.stack = torch.full((B, W), self.V, dtype=torch.long, device=device)   # surviving response tokens
        self.spent = torch.zeros(B, dtype=torch.long, device=device)               # BKs emitted
        # position -> tokens deleted there since the token below it was written: the retry count (§4)
        self.deleted = torch.zeros(B, W, dtype=torch.long, device=device)
        # position -> banned tokens (V: none). Slots 0..K-1 take the slot bans under `rewind`: a ban's
        # slot is a count that only grows, so no two bans at a position share one (the BKs the row
        # emitted before it, or with a retry limit the position's retry count); a row that does not
        # pop banks V at the slot its count points to, never used yet, which is slot K when that count
        # reached K. The last slot bans BK at the response's first position, for good (§4).
        S = K + 2 if self.slot_banning else 1
        self.ban_tok = torch.full((B, W, S), self.V, dtype=torch.long, device=device)
        self.ban_tok[self.rows, self.plen, S - 1] = self.bk
        # views made once (a step of a small model is bound by the number of tensor calls): indexed
        # at d, these reach position d + 1
        self.deleted_up, self.ban_up = self.deleted[:, 1:], self.ban_tok[:, 1:]
        # The bans are written as -inf straight into a float copy of the logits, entry by entry (no
        # (B, V) ban matrix). Column V is a spare that unused ban slots point at; it and the padding
        # columns (ids >= n_vocab) are set to -inf once, and each step copies in only the real ones.
        # The sampler reads all of it, the spare column too (probability 0): a contiguous tensor,
        # which log_softmax and the draw take as it is (a (B, V) view of it would be copied first).
        self.banned = torch.full((B, self.V + 1), float("-inf"), device=device)
        self.real, self.bk_col, self.col0 = self.banned[:, :self.NV], self.banned[:, self.bk], self.banned[:, 0]
        # a row can have every token banned only if its slot bans (at most K) and BK cover all
        # n_vocab tokens: otherwise the check is skipped
        self.can_stick = self.slot_banning and K + 1 >= self.NV
        self.live = torch.ones(B, dtype=torch.bool, device=device)
        self.actions, self.logprobs, self.alive, self.kept_logits, self.verdicts = [], [], [], [], []

    def prefill(self, prompts, Tp):
        """One forward over the (right-padded) prompts; each row's length is then its prompt's."""
        B = len(prompts)
        idx = torch.zeros(B, Tp, dtype=torch.long, device=self.device)
        for b, p in enumerate(prompts):
            idx[b, :len(p)] = torch.tensor(p, device=self.device)
        with self.timer("prefill"):
            self.model.hidden(idx, torch.arange(Tp, device=self.device).expand(B, Tp), cache=self.cache,
                              weights=self.weights)
        self.cache.lengths.copy_(self.plen)

    def run(self):
        """Every row acts once a step until all have ended or the steps run out; returns the outputs."""
        for step in range(self.steps):
            logits, p_wrong = self.read(step)
            banned = self.ban(logits)
            nxt, lp = self.choose(step, logits, banned, p_wrong)
            self.record(nxt, lp, logits, p_wrong)
            is_bk = nxt == self.bk
            pop = self.pops(is_bk)
            if self.on_step is not None:
                self.stream(nxt, pop)
            write = self.apply(step, nxt, is_bk, pop)
            if not self.advance(nxt, write, self.ended(step, nxt)):
                break
        return self.results()

    def read(self, step):
        """Each row's next logits (B, V) from the stored hidden state of its last token, and with a
        verifier head the probability that that token is wrong (the head reads the hidden state
        the next token's logits come from)."""
        # read at the row's cache length: under `rewind` the cache holds the prompt and the
        # surviving tokens, at the same positions as the tables (so a pop is top's decrement, §3);
        # under `keep` the prompt and every action
        length = self.top if self.rewind else self.plen + step
        if self.capped:   # (a row that finished at the cap goes on from its last slot)
            length = length.clamp(max=self.max_len)
        h = self.cache.h[self.rows, length]
        with self.timer("model"):
            logits = linear(self.model.lm_head, h, self.weights)
            if self.verifier is None:
                return logits, None
            return logits, torch.sigmoid(linear(self.verifier, h, self.weights).squeeze(-1).float())

    def ban(self, logits):
        """The logits with the bans of §4 written in as -inf: the slot bans and BK at the response's
        first position (ban_tok), BK once max_backtracks are spent, and BK on a token already
        deleted and rewritten max_retries times. Returns self.banned, (B, V + 1). A row whose every
        token is banned ends here (self.live)."""
        self.real.copy_(logits[:, :self.NV])
        self.banned.scatter_(1, self.ban_tok[self.rows, self.top], float("-inf"))
        no_bk = self.spent >= self.max_backtracks if self.max_backtracks is not None else None
        if self.max_retries is not None:
            tired = self.deleted[self.rows, self.top - 1] >= self.max_retries
            no_bk = tired if no_bk is None else no_bk | tired
        if no_bk is not None:
            self.bk_col.masked_fill_(no_bk, float("-inf"))
        if self.can_stick:
            # a row whose every token is banned has tried and deleted everything at this slot: it
            # ends (the logits themselves are finite, so only bans put every entry at -inf). Its
            # action is discarded; token 0 is unbanned only to keep its distribution defined.
            stuck = torch.isneginf(self.banned.amax(-1))
            self.live = self.live > stuck
            self.col0.masked_fill_(stuck, 0.0)
        return self.banned

    def record(self, nxt, lp, logits, p_wrong):
        """Keep this step's actions, their log-probs and which rows were live, for results()."""
        self.actions.append(nxt)
        self.logprobs.append(lp[self.rows, nxt])
        self.alive.append(self.live)
        if self.return_logits:
            self.kept_logits.append(logits)
        if self.return_verifier:
            self.verdicts.append(p_wrong)

    def choose(self, step, logits, banned, p_wrong):
        """Each row's action (B,) and the log-probs (B, V + 1) it was drawn from: the subclass's."""
        raise NotImplementedError

    def ended(self, step, nxt):
        """The rows whose action ends them (None: none can end here): the subclass's."""
        raise NotImplementedError

    def pops(self, is_bk):
        """Which actions pop: every BK (banned on an empty response, so it always has a token to delete)."""
        return is_bk

    def stream(self, nxt, pop):
        """on_step(row, token, popped token or None) for each live row's action: one sync, only when asked."""
        gone = self.stack[self.rows, self.top - 1]
        for b in self.live.nonzero().flatten().tolist():
            self.on_step(b, int(nxt[b]), int(gone[b]) if pop[b] else None)

    def apply(self, step, nxt, is_bk, pop):
        """Apply each row's action to its stack, retry counts and bans, and set the cache slot it is
        written to (cache.lengths). Returns the rows whose action goes into the cache."""
        rows, V = self.rows, self.V
        # a pop from top d+1 to d: the popped token's own retry count and bans go with it; the
        # token is banned at position d (rewind) and position d counts one more retry. Under
        # `rewind` d is also the row's new cache length (§3) and where this step's action is
        # written: a push's token, or a popped row's dummy in the slot it freed. Under `keep` every
        # action is written, at the slot after the last. (alpha=-1: a bool can be added, not subtracted)
        d = self.top.add(pop, alpha=-1)
        if self.rewind:
            self.cache.lengths.copy_(d)
        else:
            torch.add(self.plen, step, out=self.cache.lengths)
        if self.max_retries is not None:
            self.deleted_up[rows, d] = 0
            slot = self.deleted[rows, d]   # <= K, and < K for a row that pops
            self.deleted[rows, d] = slot + pop
        else:
            slot = self.spent   # (read before spent counts this step's BK)
        if self.slot_banning:
            self.ban_up[rows, d] = V
            self.ban_tok[rows, d, slot] = self.stack[rows, d]
        self.spent.add_(is_bk)
        push = ~is_bk
        self.stack[rows, d] = torch.where(push, nxt, V)   # a push writes its token; a pop frees the slot
        self.top = d + push
        return push if self.rewind else self.live

    def advance(self, nxt, write, ended):
        """End the rows that ended (or whose cache is full), then write this step's tokens into the
        cache in one batched forward. False once every row has ended."""
        if self.capped:
            self.cache.lengths.clamp_(max=self.max_len - 1)
            full = self.cache.lengths + write >= self.max_len
            ended = full if ended is None else ended | full
        if ended is not None:
            self.live = self.live > ended   # live and not ended (a row already done stays so)
        if ended is not None or self.can_stick:   # else every row is live
            write = write & self.live
        if not bool(write.any()):   # one host read per step
            # every live row rewound: nothing to write, the next logits are in cache.h already
            return bool(self.live.any())
        # rows that rewound or finished write a dummy, where nothing attends
        with self.timer("model"):
            self.model.hidden(nxt.unsqueeze(1), self.cache.lengths.unsqueeze(1), cache=self.cache, weights=self.weights)
        return True

    def results(self):
        """Per row, dict(response=its actions, BKs included, logprobs=each one's log-prob, resolved=the
        ids it resolves to, logits=each one's raw logits or [], and with return_verifier verifier=
        the head's probability at each), from one transfer of everything recorded."""
        B = len(self.rows)
        A = torch.stack(self.actions, 1).tolist() if self.actions else [[] for _ in range(B)]
        L = torch.stack(self.logprobs, 1).tolist() if self.actions else [[] for _ in range(B)]
        M = torch.stack(self.alive, 1).tolist() if self.actions else [[] for _ in range(B)]
        P = torch.stack(self.verdicts, 1).tolist() if self.verdicts else None
        out = []
        for b in range(B):
            keep = [i for i, a in enumerate(M[b]) if a]
            response = [A[b][i] for i in keep]
            o = dict(response=response, logprobs=[L[b][i] for i in keep], resolved=resolve(response, self.bk))
            o["logits"] = [self.kept_logits[i][b] for i in keep] if self.return_logits else []
            if P is not None:
                o["verifier"] = [P[b][i] for i in keep]
            out.append(o)
        return out


class Sampling(Decoder):
    """generate's decoder: each action is drawn from the banned distribution (its argmax at
    temperature 0), and pop_below and trigger may make it BK; a row ends at a stop id."""

    def __init__(self, model, prompts, steps, *, seed, stop_ids, pop_below, trigger, **kw):
        super().__init__(model, prompts, steps, **kw)
        self.gen = torch.Generator(device=self.device)
        if seed is not None:
            self.gen.manual_seed(seed)
        temperature = self.sampling[0]
        self.greedy = not (temperature and temperature > 0)
        self.pop_below, self.trigger = pop_below, trigger
        stops = torch.tensor(stop_ids, dtype=torch.long, device=self.device)
        self.stop = int(stops[0]) if len(stops) == 1 else None   # one stop id: compared as a Python int
        self.stops = stops if len(stops) > 1 else None

    def choose(self, step, logits, banned, p_wrong):
        """Each row's action and the log-probs it was drawn from."""
        bk_allowed = ~torch.isneginf(self.bk_col) if self.pop_below > 0 or self.trigger > 0 else None
        if self.pop_below > 0:   # the model's own distribution, before the sampler's shaping
            liked = logits[:, :self.NV].float().softmax(-1).masked_fill(torch.isneginf(self.real), 0.0)
            out_of_values = (liked.sum(-1) - liked[:, self.bk] < self.pop_below) & bk_allowed
        with self.timer("sampler"):
            lp = shape_logits(banned, *self.sampling)
            nxt = lp.argmax(-1) if self.greedy else sample(lp, self.gen)
        if self.pop_below > 0:
            nxt = torch.where(out_of_values, self.bk, nxt)
        if self.trigger > 0:
            nxt = torch.where((p_wrong > self.trigger) & bk_allowed, self.bk, nxt)
        return nxt, lp

    def ended(self, step, nxt):
        """The rows whose action is a stop id (None: no stop id, no row ends here)."""
        if self.stop is not None:
            return nxt == self.stop
        return torch.isin(nxt, self.stops) if self.stops is not None else None


class Replay(Decoder):
    """replay's decoder: each row's actions are given, and a row ends when its list does."""

    def __init__(self, model, prompts, actions, **kw):
        # The cache must hold every action. Given actions may ignore the caps, and a BK on an empty
        # response counts as emitted while it pops nothing, so the sampling bound on a ban's slot
        # (its count) does not hold: a trace's BKs bound every count it reaches, and size the table
        bk = model.config.bk_id
        super().__init__(model, prompts, max(len(a) for a in actions),
                         ban_slots=max(1, max(list(a).count(bk) for a in actions)), **kw)
        forced = torch.zeros(len(actions), max(self.steps, 1), dtype=torch.long)
        for b, a in enumerate(actions):
            forced[b, :len(a)] = torch.tensor(a, dtype=torch.long)
        self.forced = forced.to(self.device)
        self.n_actions = torch.tensor([len(a) for a in actions], device=self.device)
        self.live = self.n_actions > 0

    def choose(self, step, logits, banned, p_wrong):
        """Each row's given action, and the log-probs it would have been drawn from."""
        with self.timer("sampler"):
            lp = shape_logits(banned, *self.sampling)
        return self.forced[:, step], lp

    def pops(self, is_bk):
        # a BK on an empty response (which sampling never draws: it is banned) is kept as an
        # action and deletes nothing
        return is_bk & (self.top > self.plen)

    def ended(self, step, nxt):
        return step + 1 >= self.n_actions

# -----------------------------------------------------------------------------
# generation and replay


# inference_mode, not no_grad: the many small tensors of a step carry no version counter or view
# tracking, which makes each tensor call cheaper (the bookkeeping's share of a 64-row rollout step
# fell from ~2.8% to ~2.4% on CPU). What comes back is plain lists, and with return_logits
# tensors that cannot enter autograd.
@torch.inference_mode()
def generate(model, prompts, max_new_tokens=128, rule=Rule(), temperature=1.0, top_k=0, top_p=1.0,
             max_backtracks=None, seed=None, stop_at_eot=True, on_step=None, return_logits=False,
             device=None, stop_ids=None, pop_below=0.0, trigger=0.0, return_verifier=False, timer=None):
    """Sample a response for each prompt (list of id lists), all rows in one cache, under a decoding
    rule (data.Rule: the policy, slot bans and retry limit).

    policy 'keep': BK is appended like any token. policy 'rewind': BK frees the top slot in place
    (the row's cache length drops by one, as in KVCache.pop) and is not written; the slot below acts
    again from its stored hidden state. Bans
    (docs/backtrack-semantics.md §4, the same rules as data.layout): BK while the response is
    empty, BK once max_backtracks are spent, BK on a slot already backtracked rule.max_retries
    times, and under 'rewind' with rule.slot_bans every token deleted at a slot, there. A row whose every
    token is banned ends. Rows end at any of stop_ids (default: end-of-text, unless stop_at_eot
    is False). Returns, per row, dict(response=raw actions incl. BK, logprobs=log-prob of each
    action under the sampled distribution, resolved=ids).
    on_step(row, token, popped_token_or_None) is called for each action (for streaming).
    return_logits: also return each action's raw logits.
    pop_below: a search's way out (an evaluation-time rule; training never sees it): where the
    tokens still allowed, BK aside, hold less than this share of the model's own (unbanned)
    distribution, i.e. every value it likes is banned at this slot, the action is BK (when BK is
    allowed). Its log-prob is BK's under the banned distribution. 0 = off.
    trigger: with a verifier head (model.add_verifier), the action is BK wherever the head's
    probability that the last surviving token is wrong exceeds trigger and BK is allowed (the same
    bans and caps); its log-prob is BK's under the banned distribution, as for pop_below. 0 = off.
    return_verifier: also return, per row, `verifier`: that probability at each action (the head is
    computed only when a trigger or this asks for it).
    timer: timer(phase) returns a context manager, entered around each phase of the decoding:
    "prefill" (the prompts' forward), "model" (each step's head and forward) and "sampler"
    (shape_logits and the draw); what lies between is the bookkeeping (speed.bench_rollout).
    """
    verifier = verifier_head(model, trigger > 0 or return_verifier)
    if not rule.greedy_defined and not (temperature and temperature > 0):
        raise ValueError("greedy `rewind` decoding needs slot bans or a retry limit: a rewound state equals an "
                         "earlier one, so greedy decoding would loop (docs/backtrack-semantics.md §4)")
    if stop_ids is None:
        stop_ids = [model.config.eot_id] if stop_at_eot else []
    return Sampling(model, prompts, max_new_tokens, rule=rule, max_backtracks=max_backtracks,
                    temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, stop_ids=list(stop_ids), pop_below=pop_below, trigger=trigger, verifier=verifier,
                    on_step=on_step, return_logits=return_logits, return_verifier=return_verifier,
                    device=device, timer=timer).run()


@torch.inference_mode()
def replay(model, prompts, actions, rule=Rule(), max_backtracks=None, temperature=1.0, top_k=0, top_p=1.0,
           on_step=None, return_logits=False, return_verifier=False, device=None, timer=None):
    """Feed each row's given actions (a list per prompt) through generate's decoding steps under a
    decoding rule (data.Rule) and the same bans, instead of sampling them (tests, scoring): the
    outputs are generate's, each action's log-prob the one of the distribution it would have been
    drawn from. A row ends when its list does, however many actions that is; a BK on an empty
    response is kept and deletes nothing."""
    return Replay(model, prompts, actions, rule=rule, max_backtracks=max_backtracks,
                  temperature=temperature, top_k=top_k, top_p=top_p,
                  verifier=verifier_head(model, return_verifier), on_step=on_step, return_logits=return_logits,
                  return_verifier=return_verifier, device=device, timer=timer).run()
