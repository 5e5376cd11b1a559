"""
Backtrack data, all in token ids: the one `resolve`, token roles, traces, the training layouts of
the two context policies, batching, the augmentations that turn clean solutions into traces with
errors and backtracks, and the backtrack curriculum.

The contract is docs/backtrack-semantics.md; in short:
- resolve (§1): a normal token is pushed, BK pops (a no-op on an empty response), left to right.
- roles (§2): each response token is FINAL (survives), ERROR (popped later) or BK.
- policy `keep` (§3): the model sees the raw trace with plain causal attention.
- policy `rewind` (§3): BK is an action, not content. Only normal tokens are written; each token
  sits at its cache slot (position id) and attends to the tokens that were in the cache when it was
  written. A slot may act several times (E1, then BK pops it, then C); every token deleted at a
  slot is banned there until the slot itself is popped (§4), so greedy decoding cannot loop.
A trace is never built by editing text and re-tokenizing: `resolve(trace) == clean response` must
hold in ids, and build_traces asserts it.
"""
import difflib
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import torch

from tasks import prompt_ids, read_jsonl

# -----------------------------------------------------------------------------
# resolution: the one function every file calls


def resolve(ids, bk_id):
    """Apply backtracks: each BK deletes the previous surviving token; never below empty."""
    out = []
    for t in ids:
        if t == bk_id:
            if out:
                out.pop()
        else:
            out.append(t)
    return out


FINAL, ERROR, BK = 0, 1, 2   # token roles (docs/backtrack-semantics.md §2)


def roles(response, bk_id):
    """Role of each response token: FINAL (survives resolve), ERROR (popped later) or BK."""
    r, stack = [], []
    for i, t in enumerate(response):
        if t == bk_id:
            r.append(BK)
            if stack:
                r[stack.pop()] = ERROR
        else:
            r.append(FINAL)
            stack.append(i)
    return r


def count_backtracks(response, bk_id):
    return sum(1 for t in response if t == bk_id)


@dataclass
class Trace:
    """A prompt and a response in token ids; the response may contain BK tokens.
    Roles are derived from the ids, so they can never disagree with resolve."""
    prompt: list
    response: list
    meta: dict = field(default_factory=dict)

def read_traces(path, n_vocab):
    """Traces from a JSONL file, one {"prompt": [ids], "response": [ids]} per line (self_errors.py
    writes them). Every id must be a token of the model's vocabulary (0 <= id < n_vocab) and the
    prompt non-empty; a bad line raises ValueError naming the file and the line."""
    out = []
    for i, d in read_jsonl(path):
        try:
            prompt, response = [int(x) for x in d["prompt"]], [int(x) for x in d["response"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{i}: not a trace line: needs integer lists 'prompt' and 'response' ({e!r})")
        bad = [x for x in prompt + response if not 0 <= x < n_vocab]
        if bad:
            raise ValueError(f"{path}:{i}: token id {bad[0]} is outside the model's vocabulary (0..{n_vocab - 1})")
        if not prompt:
            raise ValueError(f"{path}:{i}: empty prompt")
        out.append(Trace(prompt, response))
    if not out:
        raise ValueError(f"{path} holds no traces")
    return out

# -----------------------------------------------------------------------------
# layouts: what one training forward sees, per policy
#
# A layout is a list of nodes (tokens fed to the model) and a list of actions (what is predicted,
# and from which node's logits). Each node has a position id and a parent: it attends to its
# ancestor chain and itself. `keep` is the chain (parent = previous token) = causal attention.
# `rewind` makes the tree of the semantics page. Actions carry the loss weight and the tokens
# banned in the sampled distribution at that moment, so the training forward scores exactly the
# distribution the sampler drew from.


def as_rule(rule):
    """The decoding rule a trace is laid out, sampled and scored under (docs/backtrack-semantics.md
    §3-4): dict(policy, slot_bans, max_retries), keyword arguments of both layout() and
    decode.generate(), so the two always apply the same bans. A bare policy name means the default
    knobs (slot bans on, no retry limit)."""
    if isinstance(rule, str):
        return dict(policy=rule, slot_bans=True, max_retries=None)
    return dict(policy=rule["policy"], slot_bans=rule.get("slot_bans", True), max_retries=rule.get("max_retries"))


def layout(trace, bk_id, policy="keep", mask_errors=True, max_backtracks=None, train_prompt=False,
           slot_bans=True, max_retries=None):
    """Build the layout of one trace.

    Returns a dict: ids, pos, parent (per node), src, tgt, weight, bans (per action).
    Bans (docs/backtrack-semantics.md §4), the same rules generate() samples under:
    - both policies: BK while the response is empty (it could delete nothing), BK once
      max_backtracks are spent, and BK when it would delete a token at a slot (a stack depth) that
      has already been backtracked max_retries times (the per-slot retry limit; None = no limit);
    - `rewind` with slot_bans: every token deleted at a slot, there, until that slot is popped.
    """
    if policy not in ("keep", "rewind"):
        raise ValueError(f"unknown policy {policy!r}: expected 'keep' or 'rewind'")
    P, R = list(trace.prompt), list(trace.response)
    assert len(P) > 0, "a trace needs a non-empty prompt (the first action is read off its last token)"
    rl = roles(R, bk_id)
    ids = list(P)
    pos = list(range(len(P)))
    parent = list(range(-1, len(P) - 1))
    src, tgt, weight, bans = [], [], [], []
    # per action, the verifier head's target: is the last surviving response token an ERROR (1.0),
    # a FINAL one (0.0), or is there none yet (-1.0, not scored)? Read off the stack, so it is the
    # same under both policies
    wrong, role_of = [], {}
    if train_prompt:  # optional language-model loss on the prompt itself
        for i in range(1, len(P)):
            src.append(i - 1); tgt.append(P[i]); weight.append(1.0); bans.append(()); wrong.append(-1.0)
    stack = []          # node indices of the surviving response tokens
    ban = {}            # rewind: node index -> tokens deleted at that slot
    retries = {}        # stack depth -> deletions there since the token below it was written
    n_bk = 0
    for t, role in zip(R, rl):
        top = stack[-1] if stack else len(P) - 1
        b = set(ban.get(top, ())) if policy == "rewind" and slot_bans else set()
        if not stack or (max_backtracks is not None and n_bk >= max_backtracks) \
                or (max_retries is not None and retries.get(len(stack) - 1, 0) >= max_retries):
            b.add(bk_id)
        src.append(top if policy == "rewind" else len(ids) - 1)
        tgt.append(t)
        weight.append(0.0 if (role == ERROR and mask_errors) else 1.0)
        bans.append(tuple(sorted(b)))
        wrong.append(float(role_of[stack[-1]] == ERROR) if stack else -1.0)
        if t == bk_id:
            n_bk += 1
            if policy == "keep":
                ids.append(t); pos.append(len(ids) - 1); parent.append(len(ids) - 2)
            if stack:
                gone = stack.pop()
                ban.pop(gone, None)
                below = stack[-1] if stack else len(P) - 1
                ban.setdefault(below, set()).add(ids[gone])
                retries.pop(len(stack) + 1, None)   # the popped token's own slot count goes with it
                retries[len(stack)] = retries.get(len(stack), 0) + 1
        else:
            if policy == "keep":
                parent.append(len(ids) - 1); pos.append(len(ids))
            else:
                parent.append(top); pos.append(len(P) + len(stack))
            ids.append(t)
            stack.append(len(ids) - 1)
            role_of[len(ids) - 1] = role
    if len(ids) > len(P) and (not src or src[-1] != len(ids) - 1) and len(ids) - 1 not in set(src):
        ids.pop(); pos.pop(); parent.pop()   # the last token written never acts: no need to feed it
    return dict(ids=ids, pos=pos, parent=parent, src=src, tgt=tgt, weight=weight, bans=bans, wrong=wrong)


def completion_batch(traces, starts, bk_id, rule, max_backtracks=None, device="cpu"):
    """Collate traces so that only their completions carry weight: in trace i, the actions of
    response tokens starts[i].. have weight 1; the shared response prefix before them has weight 0
    (the prompt is never an action). mask_errors=False: an error token in a completion is the
    model's own choice and is scored like any other."""
    lays = []
    for t, s in zip(traces, starts):
        L = layout(t, bk_id, **as_rule(rule), mask_errors=False, max_backtracks=max_backtracks)
        # the layout has one action per response token, in order; the mask below relies on it
        assert len(L["tgt"]) == len(t.response) and 0 <= s <= len(t.response)
        L["weight"] = [float(i >= s) for i in range(len(L["tgt"]))]
        lays.append(L)
    return collate(lays, device=device)


def ancestor_masks(parent):
    """(B, T, T) bool from parent indices (B, T), -1 for a root (or padding): node i attends to j
    iff j is i itself or one of its ancestors.

    Pointer jumping, not one Python step per node: after round r each row holds the ancestors
    fewer than 2^r steps up, and `jump` points 2^r steps up, so OR-ing in the row found there
    doubles the reach. A tree of depth d takes ceil(log2(d + 1)) rounds of whole-batch tensor ops.
    Past a root a jump lands on row T, kept empty, so no round needs a validity mask (a broadcast
    bool AND is slow on CPU)."""
    B, T = parent.shape
    dev = parent.device
    m = torch.zeros(B, T + 1, T, dtype=torch.bool, device=dev)
    m[:, :T] = torch.eye(T, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev).unsqueeze(1)
    jump = torch.cat([torch.where(parent >= 0, parent, T), torch.full((B, 1), T, device=dev)], 1)  # row T jumps to itself
    while bool((jump[:, :T] < T).any()):
        m[:, :T] |= m[rows, jump[:, :T]]   # the right side is read in full before m changes
        jump = jump.gather(1, jump)
    return m[:, :T]


def ancestor_mask(parent):
    """(T, T) bool for one parent list: node i attends to j iff j is i itself or one of its ancestors."""
    return ancestor_masks(torch.tensor([list(parent)], dtype=torch.long).view(1, -1))[0]


def pack(layouts, max_len):
    """Greedily pack layouts into rows of at most max_len nodes (first fit, in order).
    Each packed layout keeps its own positions; parents are offset, so attention never
    crosses examples. Returns a list of rows, each a merged layout."""
    rows, cur = [], None
    for L in layouts:
        n = len(L["ids"])
        if n > max_len:
            raise ValueError(f"a trace of {n} tokens does not fit block_size={max_len}")
        if cur is None or len(cur["ids"]) + n > max_len:
            cur = dict(ids=[], pos=[], parent=[], src=[], tgt=[], weight=[], bans=[], wrong=[])
            rows.append(cur)
        off = len(cur["ids"])
        cur["ids"] += L["ids"]; cur["pos"] += L["pos"]
        cur["parent"] += [p + off if p >= 0 else -1 for p in L["parent"]]
        cur["src"] += [s + off for s in L["src"]]
        cur["tgt"] += L["tgt"]; cur["weight"] += L["weight"]; cur["bans"] += L["bans"]; cur["wrong"] += L["wrong"]
    return rows


def collate(layouts, pad_id=0, device="cpu"):
    """Batch layouts (one per row) into tensors for model.forward and the action loss.

    mask is None when every row is a plain chain (the fast causal path); otherwise (B, T, T).
    Actions are flattened across the batch: (act_row, act_src) index the model's output.
    Every field is flattened into one list and turned into a tensor at once (no per-row or
    per-node tensor work in Python): at 16 x 256 nodes this took most of a data step.
    """
    B = len(layouts)
    lens = [len(L["ids"]) for L in layouts]
    T = max(lens)
    flat = lambda key: [x for L in layouts for x in L[key]]
    long = lambda x: torch.tensor(x, dtype=torch.long)
    real = torch.arange(T) < long(lens).unsqueeze(1)          # (B, T): row-major order = flat order
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    ids[real] = long(flat("ids"))
    pos = torch.zeros((B, T), dtype=torch.long)
    pos[real] = long(flat("pos"))
    parent = torch.full((B, T), -1, dtype=torch.long)
    parent[real] = long(flat("parent"))
    chain = bool(((parent == torch.arange(T) - 1) | ~real).all())
    mask = None
    if not chain:
        mask = ancestor_masks(parent).contiguous()
        mask[~real] = False
        mask[:, :, 0] |= ~real   # padding rows attend somewhere, so softmax has no empty row
    n_act = [len(L["tgt"]) for L in layouts]
    bans = flat("bans")
    return dict(ids=ids.to(device), pos=pos.to(device), mask=None if mask is None else mask.to(device),
                act_row=torch.repeat_interleave(torch.arange(B), long(n_act)).to(device),
                act_src=long(flat("src")).to(device), tgt=long(flat("tgt")).to(device),
                weight=torch.tensor(flat("weight"), dtype=torch.float32, device=device),
                wrong=torch.tensor(flat("wrong"), dtype=torch.float32, device=device),
                ban_act=torch.repeat_interleave(torch.arange(len(bans)), long([len(b) for b in bans])).to(device),
                ban_tok=long([t for b in bans for t in b]).to(device), n_tokens=sum(lens))


class Prefetch:
    """Iterate over make(step) for each step in order, each built `ahead` steps early by one
    background thread, so that the training step does not wait for its data (tokenizing, traces,
    layouts, ancestor masks). make(step) must depend on its step alone (train_sft's batches are
    a pure function of seed and step): building early then changes no number, and resume and
    DDP stay exact. A thread rather than a worker process: torch kernels release the GIL, so
    the Python of data building runs while the step computes, nothing is pickled, and an error
    (SystemExit included) is raised in the training loop at the step it belongs to.
    `waited` is the time the consumer spent blocked on data, in seconds."""

    def __init__(self, make, steps, ahead=2):
        self.make, self.steps = make, iter(steps)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self.queue = deque(self.pool.submit(make, s) for s in islice(self.steps, ahead))
        self.waited = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        if not self.queue:
            raise StopIteration
        fut = self.queue.popleft()
        for s in islice(self.steps, 1):   # keep `ahead` steps in flight
            self.queue.append(self.pool.submit(self.make, s))
        t0 = time.perf_counter()
        out = fut.result()
        self.waited += time.perf_counter() - t0
        return out

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)

# -----------------------------------------------------------------------------
# augmentations: clean responses -> traces with backtracks, all in token ids
#
# Every function here returns a response whose resolve() is exactly the clean response it was
# given. Error tokens are never BK or end-of-text, and nothing is inserted after a final
# end-of-text token (the model must not learn to write past the end).


def _span(x, rng):
    """An int, or a random int from an inclusive (lo, hi) range."""
    return rng.randint(*x) if isinstance(x, (tuple, list)) else int(x)


def inject_random(clean_ids, bk_id, rng, n_errors, error_len=(1, 3), vocab=None, sampler=None,
                  eot_id=None, max_backtracks=None):
    """Random injection (notes 4.1): up to n_errors error spans at distinct random positions, each
    span followed by as many BKs, then the clean response carries on.

    Error tokens come from sampler(clean_ids, i, rng) -> ids (or None: no plausible error before
    clean_ids[i]), else uniformly from vocab (an id range or list), else from the response's own
    tokens. error_len (int or (lo, hi)) sets the span length when sampling from a vocabulary.
    max_backtracks caps the BKs written; the first error token never equals the clean token it
    stands in for (that would be no error at all).
    """
    clean = list(clean_ids)
    special = {bk_id, eot_id}
    assert bk_id not in clean, "a clean response has no BK"
    ends = eot_id is not None and clean and clean[-1] == eot_id
    n_pos = len(clean) if ends else len(clean) + 1  # position i: the errors go before clean[i]
    if sampler is None:
        pool = list(vocab) if vocab is not None else [t for t in clean if t not in special]
        pool = [t for t in pool if t not in special]
        if not pool:
            return clean
    budget = math.inf if max_backtracks is None else max_backtracks
    spans = {}
    for i in rng.sample(range(n_pos), n_pos):
        if len(spans) >= n_errors or budget <= 0:
            break
        right = clean[i] if i < len(clean) else None
        if sampler is not None:
            if right is None or right in special:
                continue
            err = sampler(clean, i, rng)
            if not err or err[0] == right or any(t in special for t in err):
                continue
        else:
            err = [rng.choice(pool) for _ in range(max(1, _span(error_len, rng)))]
            for _ in range(10):
                if err[0] != right:
                    break
                err[0] = rng.choice(pool)
            if err[0] == right:
                continue
        err = list(err)[:int(min(len(err), budget))]
        spans[i] = err
        budget -= len(err)
    out = []
    for i in range(len(clean) + 1):
        if i in spans:
            out += spans[i] + [bk_id] * len(spans[i])
        if i < len(clean):
            out.append(clean[i])
    return out


_SWAP_OPS = {"+": "-", "-": "+", "*": "/", "/": "*"}


def plausible_sampler(tok, max_extra=1):
    """A sampler for inject_random with errors a model plausibly makes: at a token with digits, the
    same token with one digit changed (most often by one: a near miss or a wrong operand); at an
    operator, a different operator; elsewhere none. The wrong token is sometimes followed by up to
    max_extra tokens of the right continuation, as when a slip is noticed a token late. Works on
    any tokenizer: the wrong text is encoded on its own, so a span may be several ids."""
    text_of = {}

    def text(t):
        if t not in text_of:
            s = tok.token_bytes(t).decode("utf-8", errors="replace")
            text_of[t] = None if "\ufffd" in s else s
        return text_of[t]

    def sample(clean, i, rng):
        s = text(clean[i])
        if not s:
            return None
        digits = [k for k, ch in enumerate(s) if ch in "0123456789"]
        if digits:
            k = rng.choice(digits)
            d = int(s[k])
            if rng.random() < 0.7:
                nd = (d + rng.choice((-1, 1))) % 10
            else:
                nd = rng.choice([x for x in range(10) if x != d])
            new = s[:k] + str(nd) + s[k + 1:]
        elif s.strip() in _SWAP_OPS:
            new = s.replace(s.strip(), _SWAP_OPS[s.strip()])
        else:
            return None
        err = tok.encode(new)
        more = clean[i + 1:i + 1 + rng.randint(0, max_extra)]
        return err + [t for t in more if t not in (tok.eot_id, tok.bk_id)]

    return sample


def lcs_trace(wrong_ids, right_ids, bk_id, max_divergences=None, max_backtracks=None):
    """LCS augmentation (notes 4.2): align a wrong response with the right one (difflib's matching
    blocks, a longest-common-subsequence style alignment, in token ids) and, at each divergence,
    write the wrong tokens, as many BKs, then the right tokens; shared stretches are written once.
    Only the first max_divergences divergences, and only those that fit in max_backtracks BKs in
    all, are written wrong-then-undone; the others are written right directly. A stretch the
    wrong response lacks is simply written (nothing to undo).

    A divergence never deletes a token only to type it again at the same slot. difflib can delete a
    span whose leading tokens are exactly what the right response writes next (wrong `1 5 1 2`,
    right `1 2`: delete `1 5`, keep `1 2`), which would give `1 5 BK BK 1 2`. Under `rewind` the
    deleted `1` is banned at its slot (docs/backtrack-semantics.md §4), so the trace would take an
    action of log-prob -inf; under `keep` it would teach a needless retype. So such leading tokens
    leave the divergence and are written once as shared text (`1 5 BK 2`), and a span that is
    right all through is just written. The first wrong token written is then never the token
    written at its slot after the BKs: no action of the trace is banned under either policy, and
    resolve(trace) == right still holds."""
    wrong, right = list(wrong_ids), list(right_ids)
    assert bk_id not in wrong and bk_id not in right, "inputs are plain responses"
    sm = difflib.SequenceMatcher(None, wrong, right, autojunk=False)  # autojunk would skip common tokens
    out, n_div, n_bk = [], 0, 0
    j = 0  # out resolves to right[:j] between divergences
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        # a divergence is written wrong only where the alignment still holds (j == j1); an earlier
        # divergence's shared tokens may have run past j1, and then this one is written right
        err = wrong[i1:i2] if tag != "equal" and j == j1 else []
        n = 0  # leading wrong tokens that are the right continuation: shared, not an error
        while n < len(err) and j + n < len(right) and err[n] == right[j + n]:
            n += 1
        out += err[:n]
        j += n
        err = err[n:]
        k = len(err)
        if k > 0 and (max_divergences is None or n_div < max_divergences) \
                and (max_backtracks is None or n_bk + k <= max_backtracks):
            out += err + [bk_id] * k
            n_div += 1
            n_bk += k
        if j < j2:
            out += right[j:j2]
            j = j2
    return out


RETRY_KINDS = ("retry", "retry_weak", "search")


def solution_lines_ids(tok, solution):
    """The ids of each line of a solution (its newline included, the last line without one), or
    None when tokenizing line by line does not give exactly tok.encode(solution) (a merge across a
    line break): then no line boundary in ids is safe to insert at."""
    lines = solution.split("\n")
    pieces = [tok.encode(l + "\n") for l in lines[:-1]] + [tok.encode(lines[-1])]
    return pieces if [t for x in pieces for t in x] == tok.encode(solution) else None


def inject_retry(tok, task, p, rng, kind="retry", retry_rate=0.5, max_backtracks=None):
    """Retry augmentation (Physics of Language Models part 2.2, arXiv 2408.16293): before each line
    of the clean solution, with probability retry_rate, the beginning of a line that cannot be
    written there yet, as many BKs, then the right line. kind 'retry': a variable whose inputs are
    not yet computed at that point; 'retry_weak': a variable from a later line, ready or not. The
    task names the candidates (task.retry_options(p, line_index, kind): a list, per candidate, of
    alternative beginnings as text); each beginning is encoded on its own and inserted at a line
    boundary in ids, so resolve(trace) == clean holds exactly.

    kind 'search' writes, before a chosen line, every failed attempt of a depth-first search
    (task.search_path(p, line_index)), each undone in turn: the trace of a model that looks for
    the next line by trying the variable its search stands on (our addition; see tasks.Deps).

    A wrong beginning never starts with the token the right line starts with (under `rewind` that
    token would be banned at its slot after the BKs, docs/backtrack-semantics.md §4). At most one
    retry (one search path) per line; when the coin flips choose no line, one line with candidates
    is chosen anyway, so a retry trace always retries. max_backtracks caps the BKs (retries that no
    longer fit are written shorter, or dropped; the budget goes to the chosen lines in random
    order, for 'search' in line order).
    Returns the response ids (clean + end-of-text, with the retries), or None when the task offers
    no retry options, the solution's lines cannot be cut in ids, or no retry fits."""
    options = getattr(task, "search_path" if kind == "search" else "retry_options", None)
    if options is None or kind not in RETRY_KINDS:
        return None
    pieces = solution_lines_ids(tok, p["solution"])
    if pieces is None or not all(pieces):
        return None
    special = {tok.bk_id, tok.eot_id}
    cands = []   # per line: candidates, each a list of alternatives; an alternative is a list of attempts in ids
    for k, piece in enumerate(pieces):
        per = []
        if kind != "search":   # retry kinds: one attempt; the alternatives are its beginnings
            groups = [[[a] for a in alts] for alts in options(p, k, kind)]
        else:                  # search: one candidate, one alternative, the whole path of attempts
            attempts = options(p, k)
            groups = [[attempts]] if attempts else []
        for alts in groups:
            alts = [[tok.encode(a) for a in path] for path in alts]
            alts = [path for path in alts if all(path) and path[0][0] != piece[0] and not special & set(sum(path, []))]
            if alts:
                per.append(alts)
        cands.append(per)
    eligible = [k for k, c in enumerate(cands) if c]
    if not eligible:
        return None
    chosen = [k for k in eligible if rng.random() < retry_rate] or [rng.choice(eligible)]
    if kind != "search":
        rng.shuffle(chosen)
    budget = math.inf if max_backtracks is None else max_backtracks
    wrong = {}
    for k in chosen:
        fits = [path for path in rng.choice(cands[k]) if sum(map(len, path)) <= budget]
        if fits:
            wrong[k] = rng.choice(fits)
            budget -= sum(map(len, wrong[k]))
    if not wrong:
        return None
    out = []
    for k, piece in enumerate(pieces):
        for attempt in wrong.get(k, ()):
            out += attempt + [tok.bk_id] * len(attempt)
        out += piece
    return out + [tok.eot_id]


def inject_search(tok, task, p, rng, max_backtracks=None, max_len=None):
    """The trace of a depth-first solver (task.search_trace(p, rng): characters, None for a BK; e.g.
    tasks.Sudoku), in ids: every wrong value it writes, and every token a dead end pops back through
    (the cascade), undone by BKs. Each character must be one token, so that a BK deletes exactly one
    value (byte tokens; a tokenizer that merges the characters of the solution gives None). None also
    when the search needs more than max_backtracks BKs or max_len actions: the caller trains on the
    clean solution instead (dropping a long search changes the mix; the share is counted in meta)."""
    if not hasattr(task, "search_trace"):
        raise ValueError(f"--augment=dfs: task {task.name!r} has no depth-first solver (search_trace); sudoku has one")
    actions = task.search_trace(p, rng, max_actions=max_len)
    if actions is None:
        return None
    ids = []
    for a in actions:
        t = [tok.bk_id] if a is None else tok.encode(a)
        if len(t) != 1:
            return None
        ids += t
    if max_backtracks is not None and ids.count(tok.bk_id) > max_backtracks:
        return None
    return ids + [tok.eot_id]


def random_vocab(tok):
    """Ids for uniform random errors: printable ASCII (and newline) for bytes, all of BPE."""
    if getattr(tok, "name", None) == "byte":
        return [10] + list(range(32, 127))
    special = set(getattr(tok, "special", {})) | {tok.eot_id, tok.bk_id}
    return [i for i in range(tok.n_vocab) if i not in special]


AUGMENTS = ("plausible", "random", "lcs", "dfs") + RETRY_KINDS
MIXED = ("plausible", "random", "lcs")   # what 'mixed' picks from (retry kinds are asked for by name)


def build_traces(tok, task, problems, rng, backtrack_ratio=0.5, max_backtracks=8, augment="plausible",
                 n_errors=(1, 2), error_len=(1, 3), allow_test=False, retry_rate=0.5, max_len=None):
    """Training traces: prompt ids = tasks.prompt_ids(tok, task, p) (chat-rendered when tok.chat); response = the clean solution ids
    plus end-of-text, augmented with backtracks for a backtrack_ratio share of the problems.

    augment: 'plausible' (near-miss errors), 'random' (uniform tokens), 'lcs' (align a wrong
    solution with the right one: p['wrong'], a str or list of str, when the problem carries one,
    else task.slip), 'retry' / 'retry_weak' (a line that cannot be written yet, or a later line,
    begun and undone before a line, with probability retry_rate per line: inject_retry; tasks with
    retry_options only, e.g. deps), 'dfs' (a depth-first solver's trace, inject_search: tasks with a
    search_trace, e.g. sudoku; a search without an undo, or whose trace would pass max_len tokens
    with its prompt, stays clean),
    'mixed' (one of plausible, random, lcs per trace), or a list of names to pick from. max_backtracks caps the BKs of any trace (0: every trace is clean). Where an
    augmentation finds nothing to do (no wrong solution, no plausible spot, a task without retry
    options) the trace falls back to plausible, then random, injection. Refuses test-split
    problems unless allow_test.
    """
    if not allow_test:
        task.check_train(problems)
    kinds = MIXED if augment == "mixed" else (augment,) if isinstance(augment, str) else tuple(augment)
    for k in kinds:
        assert k in AUGMENTS, f"unknown augmentation {k!r}: expected one of {AUGMENTS} or 'mixed'"
    bk, eot = tok.bk_id, tok.eot_id
    chosen = set(rng.sample(range(len(problems)), round(backtrack_ratio * len(problems))))
    sampler = plausible_sampler(tok)
    vocab = random_vocab(tok)
    traces = []
    for i, p in enumerate(problems):
        prompt = prompt_ids(tok, task, p)
        clean = tok.encode(p["solution"]) + [eot]
        resp, kind = clean, "clean"
        if i in chosen and max_backtracks != 0:
            kind = rng.choice(kinds)
            if kind == "lcs":
                wrong = p.get("wrong") or task.slip(p, rng)
                if isinstance(wrong, (list, tuple)):
                    wrong = rng.choice(wrong)
                if wrong:
                    resp = lcs_trace(tok.encode(wrong) + [eot], clean, bk, max_backtracks=max_backtracks)
            elif kind in RETRY_KINDS:
                resp = inject_retry(tok, task, p, rng, kind, retry_rate, max_backtracks) or clean
            elif kind == "dfs":   # a search that needed no undo, or did not fit, is a clean trace
                resp = inject_search(tok, task, p, rng, max_backtracks, None if max_len is None else max_len - len(prompt) - 1) or clean
                kind = "dfs" if bk in resp else "clean"
            n = _span(n_errors, rng)
            if bk not in resp and kind in ("lcs", "plausible") + RETRY_KINDS:
                resp = inject_random(clean, bk, rng, n, sampler=sampler, eot_id=eot, max_backtracks=max_backtracks)
                kind = "plausible"
            if bk not in resp and kind != "clean":
                resp = inject_random(clean, bk, rng, n, error_len=error_len, vocab=vocab, eot_id=eot,
                                     max_backtracks=max_backtracks)
                kind = "random"
        assert resolve(resp, bk) == clean, "an augmentation broke resolve(trace) == clean"
        traces.append(Trace(prompt, resp, meta=dict(augment=kind, n_bk=count_backtracks(resp, bk), index=i)))
    return traces

# -----------------------------------------------------------------------------
# curriculum (notes 7.2): how many backtracks a training trace may hold, by training progress


def phase_at(phases, progress):
    """The value of the phase in force at progress: phases are (start, value), sorted, the first at 0;
    a phase holds until the next one starts. Every schedule here (backtrack caps, reward weights,
    backtrack budgets) reads its phases through this."""
    value = phases[0][1]
    for start, v in phases:
        if progress >= start:
            value = v
    return value


@dataclass
class Curriculum:
    """Phases (start fraction of training, max backtracks per trace), e.g. '0:2,0.3:5,0.6:10':
    at most 2 BKs for the first 30% of training, 5 until 60%, then 10. A cap of 'none' means no cap."""
    phases: list = field(default_factory=lambda: [(0.0, 2), (0.3, 5), (0.6, 10)])

    def __post_init__(self):
        self.phases = sorted((float(s), m) for s, m in self.phases)
        if not self.phases or self.phases[0][0] != 0.0:
            raise ValueError(f"curriculum {self.phases}: the first phase must start at 0")
        if not all(0 <= s <= 1 for s, _ in self.phases):
            raise ValueError(f"curriculum {self.phases}: phase starts are fractions of training, in [0, 1]")
        if not all(m is None or m >= 0 for _, m in self.phases):
            raise ValueError(f"curriculum {self.phases}: caps are >= 0, or none")

    @classmethod
    def from_string(cls, s):
        phases = []
        for part in s.split(","):
            start, _, cap = part.partition(":")
            if not cap:
                raise ValueError(f"bad curriculum phase {part!r}: expected 'start:max_backtracks'")
            cap = cap.strip().lower()
            phases.append((float(start), None if cap in ("none", "inf") else int(cap)))
        return cls(phases)

    def max_backtracks(self, progress):
        """The cap in force at progress (0..1, fraction of training done)."""
        return phase_at(self.phases, progress)

    def __str__(self):
        return ",".join(f"{s:g}:{'none' if m is None else m}" for s, m in self.phases)
