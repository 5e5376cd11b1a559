"""
Backtrack data, all in token ids: the one `resolve`, token roles, traces, the decoding rule, the
training layouts of the two context policies, and batching. (The augmentations that turn clean
solutions into traces with backtracks are augment.py's; the curriculum is in schedules.py.)

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
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import torch

from common import read_jsonl

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


@dataclass(frozen=True)
class Rule:
    """The decoding rule a trace is laid out, sampled and scored under (docs/backtrack-semantics.md
    §3-4): the context policy, whether a token deleted at a slot is banned there (`rewind` only),
    and the per-slot retry limit (None = no limit). One value, passed whole to layout(),
    decode.generate(), evaluation and checkpoints, so that training and decoding apply the same bans.
    A checkpoint records it as three meta keys (asdict); Rule.of reads them back."""
    policy: str = "rewind"
    slot_bans: bool = True
    max_retries: int | None = None

    def __post_init__(self):
        if self.policy not in ("keep", "rewind"):
            raise ValueError(f"unknown policy {self.policy!r}: expected 'keep' or 'rewind'")

    @property
    def greedy_defined(self):
        """Whether greedy decoding is defined: under `rewind` a rewound state equals an earlier one,
        so greedy would loop without slot bans or a retry limit (§4). Without them only sampling is
        (a backtrack is then a resample)."""
        return self.policy != "rewind" or self.slot_bans or self.max_retries is not None

    @classmethod
    def of(cls, meta):
        """The rule a checkpoint's meta records (older checkpoints lack the last two keys)."""
        return cls(meta.get("policy", "rewind"), meta.get("slot_bans", True), meta.get("max_retries"))

    @classmethod
    def from_flags(cls, cfg, meta=None):
        """The rule a stage after SFT samples and scores with (RuleFlags): its own --policy /
        --slot_bans=on|off / --max_retries=N|none where given, else the checkpoint's (meta), so that
        decoding applies the bans the model was trained under (§4). meta=None checks the flags only."""
        mr = str(cfg.max_retries).lower()   # (--max_retries=None arrives as the text 'None')
        if cfg.policy not in ("", "keep", "rewind") or cfg.slot_bans not in ("", "on", "off") or not (
                mr in ("", "none") or mr.isdigit()):
            raise ValueError(f"--policy={cfg.policy} --slot_bans={cfg.slot_bans} --max_retries={cfg.max_retries}: "
                             "expected keep|rewind, on|off and a number or none (or leave them out: the checkpoint's)")
        base = cls.of(meta or {})
        return cls(cfg.policy or base.policy,
                   base.slot_bans if cfg.slot_bans == "" else cfg.slot_bans == "on",
                   base.max_retries if mr == "" else None if mr == "none" else int(mr))


@dataclass
class RuleFlags:
    """The decoding-rule flags of every stage after SFT (a base of their Config): "" takes the
    checkpoint's (Rule.from_flags)."""
    policy: str = ""                 # rewind | keep; "" = the checkpoint's
    slot_bans: str = ""              # on | off; "" = the checkpoint's (docs/backtrack-semantics.md §4)
    max_retries: str = ""            # per-slot retry limit: a number | none; "" = the checkpoint's


def layout(trace, bk_id, rule, mask_errors=True, max_backtracks=None, train_prompt=False):
    """Build the layout of one trace under a decoding rule (Rule).

    Returns a dict: ids, pos, parent (per node), src, tgt, weight, bans (per action).
    Bans (docs/backtrack-semantics.md §4), the same rules generate() samples under:
    - both policies: BK while the response is empty (it could delete nothing), BK once
      max_backtracks are spent, and BK when it would delete a token at a slot (a stack depth) that
      has already been backtracked max_retries times (the per-slot retry limit; None = no limit);
    - `rewind` with slot_bans: every token deleted at a slot, there, until that slot is popped.
    """
    policy, slot_bans, max_retries = rule.policy, rule.slot_bans, rule.max_retries
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
        L = layout(t, bk_id, rule, mask_errors=False, max_backtracks=max_backtracks)
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


@dataclass
class Batch:
    """What collate returns and every loss takes (model.action_logits and the losses after it): the
    nodes of B layouts, right-padded to T, and their actions flattened across the batch."""
    ids: torch.Tensor               # (B, T) the tokens fed
    pos: torch.Tensor               # (B, T) their position ids (a rewound slot's is reused, §3)
    mask: torch.Tensor | None       # (B, T, T) who attends to whom; None: every row a plain chain (causal)
    act_row: torch.Tensor           # (A,) each action's row
    act_src: torch.Tensor           # (A,) the node whose logits predict it
    tgt: torch.Tensor               # (A,) the action's token
    weight: torch.Tensor            # (A,) its loss weight (0: masked, e.g. an error token)
    wrong: torch.Tensor             # (A,) the verifier head's target: 1 ERROR, 0 FINAL, -1 not scored
    ban_act: torch.Tensor           # (N,) the bans, one entry each: the action banned at,
    ban_tok: torch.Tensor           # (N,) and the token banned there (§4)
    n_tokens: int                   # real (unpadded) nodes: the tokens a step trains on


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
    return Batch(ids=ids.to(device), pos=pos.to(device), mask=None if mask is None else mask.to(device),
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
