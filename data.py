"""
Backtrack data: tokenizers, the one `resolve` function, traces with roles, label masks and the
attention layouts of the two context policies, then tasks with exact verifiers, augmentations
and the backtrack curriculum.

Everything here works in token-id space. A trace is never built by editing text and
re-tokenizing: `resolve(trace) == clean response` must hold in ids.

The contract is ../shared/docs/backtrack-semantics.md; the short version:
- resolve: a normal token is pushed, BK pops (a no-op on an empty response), left to right.
- roles: each response token is KEEP (survives), ERROR (popped later) or BK.
- policy `keep`: the model sees the raw trace with plain causal attention.
- policy `rewind`: BK is an action, not content. Only normal tokens are written; each token sits
  at its cache slot (position id) and attends to the tokens that were in the cache when it was
  written. A slot may act several times (E1, then BK pops it, then C); every token deleted at a
  slot is banned there until the slot itself is popped, so greedy decoding cannot loop.
"""
import json
import math
import os
import random
import re
from dataclasses import dataclass, field

import torch

# -----------------------------------------------------------------------------
# tokenizers

BK_TEXT = "<|BACKTRACK|>"
EOT_TEXT = "<|endoftext|>"
REPO_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_GPT2_RANKS = os.path.join(REPO_DIR, "..", "shared", "assets", "gpt2.tiktoken")
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer:
    """A tiktoken encoding plus the two special tokens every model here knows.

    name='byte': 256 byte tokens (tiny models trained from scratch; a digit is one token).
    name='gpt2': GPT-2 BPE from a local ranks file (id = rank), else tiktoken's own copy.
    `encode` never produces special tokens from user text: a literal "<|BACKTRACK|>" typed by a
    user is ordinary text. Special ids are added only by code, through eot_id and bk_id.
    """

    def __init__(self, name="byte", path=None):
        import tiktoken
        self.name = name
        if name == "byte":
            ranks = {bytes([i]): i for i in range(256)}
            pat = r"[\s\S]"  # every byte is its own piece; no merges exist anyway
        elif name == "gpt2":
            path = path or os.environ.get("GPT2_TIKTOKEN", DEFAULT_GPT2_RANKS)
            if os.path.exists(path):
                from tiktoken.load import load_tiktoken_bpe
                ranks = load_tiktoken_bpe(path)
            elif path != DEFAULT_GPT2_RANKS and not os.environ.get("GPT2_TIKTOKEN"):
                raise FileNotFoundError(f"gpt2 ranks file not found: {path}")
            else:
                try:  # needs a network; the ranks file is the offline path
                    ranks = tiktoken.get_encoding("gpt2")._mergeable_ranks
                except Exception as e:
                    raise FileNotFoundError(
                        f"gpt2 ranks file not found at {path} and tiktoken could not download it ({e}); "
                        "pass --tokenizer_path=/path/to/gpt2.tiktoken (it ships in the openai-whisper sdist)") from e
            pat = GPT2_PAT
        else:
            raise ValueError(f"unknown tokenizer {name!r}: expected 'byte' or 'gpt2'")
        n = len(ranks)
        self.eot_id, self.bk_id = n, n + 1
        self.enc = tiktoken.Encoding(f"{name}_bk", pat_str=pat, mergeable_ranks=ranks,
                                     special_tokens={EOT_TEXT: self.eot_id, BK_TEXT: self.bk_id})
        self.n_vocab = n + 2
        self.path = path

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def token_bytes(self, i):
        if i == self.bk_id:
            return BK_TEXT.encode()
        if i == self.eot_id:
            return EOT_TEXT.encode()
        return self.enc.decode_single_token_bytes(i)

    def decode(self, ids):
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


def get_tokenizer(name, path=None):
    return Tokenizer(name, path)

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


KEEP, ERROR, BK = 0, 1, 2


def roles(response, bk_id):
    """Role of each response token: KEEP (survives resolve), ERROR (popped later) or BK."""
    r, stack = [], []
    for i, t in enumerate(response):
        if t == bk_id:
            r.append(BK)
            if stack:
                r[stack.pop()] = ERROR
        else:
            r.append(KEEP)
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

    def resolved(self, bk_id):
        return resolve(self.response, bk_id)

    def roles(self, bk_id):
        return roles(self.response, bk_id)

# -----------------------------------------------------------------------------
# layouts: what one training forward sees, per policy
#
# A layout is a list of nodes (tokens fed to the model) and a list of actions (what is predicted,
# and from which node's logits). Each node has a position id and a parent: it attends to its
# ancestor chain and itself. `keep` is the chain (parent = previous token) = causal attention.
# `rewind` makes the tree of the semantics page. Actions carry the loss weight and the tokens
# banned in the sampled distribution at that moment, so the training forward scores exactly the
# distribution the sampler drew from.


def layout(trace, bk_id, policy="keep", mask_errors=True, max_backtracks=None, train_prompt=False):
    """Build the layout of one trace.

    Returns a dict: ids, pos, parent (per node), src, tgt, weight, bans (per action).
    Bans, applied in both policies: BK while the response is empty (it could delete nothing),
    BK once max_backtracks are spent; and under `rewind` every token deleted at a slot.
    """
    P, R = list(trace.prompt), list(trace.response)
    assert len(P) > 0, "a trace needs a non-empty prompt (the first action is read off its last token)"
    rl = roles(R, bk_id)
    ids = list(P)
    pos = list(range(len(P)))
    parent = list(range(-1, len(P) - 1))
    src, tgt, weight, bans = [], [], [], []
    if train_prompt:  # optional language-model loss on the prompt itself
        for i in range(1, len(P)):
            src.append(i - 1); tgt.append(P[i]); weight.append(1.0); bans.append(())
    stack = []          # node indices of the surviving response tokens
    ban = {}            # rewind: node index -> tokens deleted at that slot
    n_bk = 0
    for t, role in zip(R, rl):
        top = stack[-1] if stack else len(P) - 1
        b = set(ban.get(top, ())) if policy == "rewind" else set()
        if not stack or (max_backtracks is not None and n_bk >= max_backtracks):
            b.add(bk_id)
        src.append(top if policy == "rewind" else len(ids) - 1)
        tgt.append(t)
        weight.append(0.0 if (role == ERROR and mask_errors) else 1.0)
        bans.append(tuple(sorted(b)))
        if t == bk_id:
            n_bk += 1
            if policy == "keep":
                ids.append(t); pos.append(len(ids) - 1); parent.append(len(ids) - 2)
            if stack:
                gone = stack.pop()
                ban.pop(gone, None)
                below = stack[-1] if stack else len(P) - 1
                ban.setdefault(below, set()).add(ids[gone])
        else:
            if policy == "keep":
                parent.append(len(ids) - 1); pos.append(len(ids))
            elif policy == "rewind":
                parent.append(top); pos.append(len(P) + len(stack))
            else:
                raise ValueError(f"unknown policy {policy!r}: expected 'keep' or 'rewind'")
            ids.append(t)
            stack.append(len(ids) - 1)
    if len(ids) > len(P) and (not src or src[-1] != len(ids) - 1) and len(ids) - 1 not in set(src):
        ids.pop(); pos.pop(); parent.pop()   # the last token written never acts: no need to feed it
    return dict(ids=ids, pos=pos, parent=parent, src=src, tgt=tgt, weight=weight, bans=bans)


def ancestor_mask(parent):
    """(T, T) bool: node i attends to j iff j is i itself or one of its ancestors."""
    T = len(parent)
    m = torch.zeros(T, T, dtype=torch.bool)
    for i, p in enumerate(parent):
        if p >= 0:
            m[i] = m[p]
        m[i, i] = True
    return m


def is_chain(parent):
    return all(p == i - 1 for i, p in enumerate(parent))


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
            cur = dict(ids=[], pos=[], parent=[], src=[], tgt=[], weight=[], bans=[])
            rows.append(cur)
        off = len(cur["ids"])
        cur["ids"] += L["ids"]; cur["pos"] += L["pos"]
        cur["parent"] += [p + off if p >= 0 else -1 for p in L["parent"]]
        cur["src"] += [s + off for s in L["src"]]
        cur["tgt"] += L["tgt"]; cur["weight"] += L["weight"]; cur["bans"] += L["bans"]
    return rows


def collate(layouts, pad_id=0, device="cpu"):
    """Batch layouts (one per row) into tensors for model.forward and the action loss.

    mask is None when every row is a plain chain (the fast causal path); otherwise (B, T, T).
    Actions are flattened across the batch: (act_row, act_src) index the model's output.
    """
    B = len(layouts)
    T = max(len(L["ids"]) for L in layouts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    chain = all(is_chain(L["parent"]) for L in layouts)
    mask = None if chain else torch.zeros(B, T, T, dtype=torch.bool)
    rows, srcs, tgts, ws, ban_a, ban_t = [], [], [], [], [], []
    for b, L in enumerate(layouts):
        n = len(L["ids"])
        ids[b, :n] = torch.tensor(L["ids"])
        pos[b, :n] = torch.tensor(L["pos"])
        if mask is not None:
            mask[b, :n, :n] = ancestor_mask(L["parent"])
            mask[b, n:, 0] = True  # padding rows attend somewhere, so softmax has no empty row
        for s, t, w, bn in zip(L["src"], L["tgt"], L["weight"], L["bans"]):
            a = len(rows)
            rows.append(b); srcs.append(s); tgts.append(t); ws.append(w)
            for x in bn:
                ban_a.append(a); ban_t.append(x)
    t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=device)
    return dict(ids=ids.to(device), pos=pos.to(device), mask=None if mask is None else mask.to(device),
                act_row=t(rows), act_src=t(srcs), tgt=t(tgts), weight=t(ws, torch.float32),
                ban_act=t(ban_a), ban_tok=t(ban_t), n_tokens=sum(len(L["ids"]) for L in layouts))
