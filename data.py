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
# Llama 3 and Qwen2/Qwen3 split text like GPT-4's cl100k (case-insensitive contractions, a word may
# take one leading non-letter, newlines stay apart). They differ in digits: Llama 3 keeps runs of up
# to three together, Qwen splits every digit. A tokenizer.json carries its own regex, which wins.
LLAMA3_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Meta's tokenizer.model holds only the BPE ranks; these 256 special tokens follow them, in order
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                   ] + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]


class Tokenizer:
    """A tiktoken encoding plus the special tokens every model here knows (eot_id, bk_id).

    name='byte': 256 byte tokens (tiny models trained from scratch; a digit is one token).
    name='gpt2': GPT-2 BPE from a local ranks file (id = rank), else tiktoken's own copy.
    path=a Hugging Face folder: that checkpoint's byte-level BPE (Llama 3, Qwen2/Qwen3, GPT-2), with
    its own special tokens, eot = its eos token and BK on a reserved id (see read_hf_tokenizer).
    `encode` never produces special tokens from user text: a literal "<|BACKTRACK|>" typed by a
    user is ordinary text. Special ids are added only by code (eot_id, bk_id, bos_id, chat_ids).
    """

    def __init__(self, name="byte", path=None):
        import tiktoken
        if path is not None and os.path.isdir(path):
            spec = read_hf_tokenizer(path)
        elif name == "byte":
            spec = dict(ranks={bytes([i]): i for i in range(256)},
                        pat=r"[\s\S]")  # every byte is its own piece; no merges exist anyway
        elif name == "gpt2":
            path = path or os.environ.get("GPT2_TIKTOKEN", DEFAULT_GPT2_RANKS)
            if os.path.exists(path):
                ranks = load_ranks(path)
            elif path != DEFAULT_GPT2_RANKS and not os.environ.get("GPT2_TIKTOKEN"):
                raise FileNotFoundError(f"gpt2 ranks file not found: {path}")
            else:
                try:  # needs a network; the ranks file is the offline path
                    ranks = tiktoken.get_encoding("gpt2")._mergeable_ranks
                except Exception as e:
                    raise FileNotFoundError(
                        f"gpt2 ranks file not found at {path} and tiktoken could not download it ({e}); "
                        "pass --tokenizer_path=/path/to/gpt2.tiktoken (it ships in the openai-whisper sdist)") from e
            spec = dict(ranks=ranks, pat=GPT2_PAT)
        else:
            raise ValueError(f"unknown tokenizer {name!r}: expected 'byte', 'gpt2' or a Hugging Face folder")
        if "special" not in spec:  # our own vocabularies: eot and BK follow the ranks
            n = len(spec["ranks"])
            spec.update(name=name, special={n: EOT_TEXT, n + 1: BK_TEXT}, eot_id=n, bk_id=n + 1)
        self.name = spec["name"]
        self.path = path
        self.special = spec["special"]        # id -> text of every special token (eot, BK, chat markers)
        self.eot_id, self.bk_id = spec["eot_id"], spec["bk_id"]
        self.bos_id = spec.get("bos_id")      # Llama 3 text starts with <|begin_of_text|>; None elsewhere
        self.nfc = spec.get("nfc", False)     # Qwen normalises text to NFC before splitting it
        self.enc = tiktoken.Encoding(f"{self.name}_bk", pat_str=spec["pat"], mergeable_ranks=spec["ranks"],
                                     special_tokens={t: i for i, t in self.special.items()})
        self.n_vocab = max(max(spec["ranks"].values()), max(self.special)) + 1

    def encode(self, text):
        if self.nfc:
            import unicodedata
            text = unicodedata.normalize("NFC", text)
        return self.enc.encode_ordinary(text)

    def token_bytes(self, i):
        if i in self.special:
            return self.special[i].encode()
        return self.enc.decode_single_token_bytes(i)

    def decode(self, ids):
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


def get_tokenizer(name, path=None):
    """'byte', 'gpt2' (path: its ranks file), or a Hugging Face folder given as path or as name."""
    if path is None and name not in ("byte", "gpt2") and os.path.isdir(str(name)):
        name, path = None, name
    return Tokenizer(name, path)


def load_ranks(path):
    """tiktoken's rank file: one `base64(token) rank` per line (gpt2.tiktoken, Llama 3's tokenizer.model)."""
    import base64
    import binascii
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    try:
        return {base64.b64decode(tok, validate=True): int(rank) for tok, rank in (l.split() for l in lines if l)}
    except (ValueError, binascii.Error) as e:
        raise ValueError(f"{path} is not a tiktoken rank file (a SentencePiece model? Llama 1/2 "
                         "tokenizers are not supported)") from e


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 bytes to printable characters, which is how byte-level BPE
    vocabularies are stored as JSON text: printable Latin-1 bytes stand for themselves, every other
    byte b is the n-th character after chr(255), in byte order (so b' ' is 'Ġ', b'\\n' is 'Ċ')."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_level_ranks(vocab, merges, special=()):
    """tiktoken ranks (token bytes -> id) from a byte-level BPE vocabulary (text -> id) and its merges.

    A vocab entry is a BPE token when it is one byte or the result of a merge; other entries (GPT-2's
    <|endoftext|> sits in vocab.json) come back as special tokens {id: text}. The rank is the id.
    tiktoken merges the adjacent pair whose result has the lowest rank, Hugging Face the pair listed
    first in merges; the two agree when the merge results' ids rise along the list, as they do in
    vocabularies converted from tiktoken (GPT-2, Llama 3, Qwen). That is checked, not assumed.
    """
    dec = {c: b for b, c in bytes_to_unicode().items()}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    made = {a + b for a, b in merges}
    ranks, extra = {}, {}
    for text, i in vocab.items():
        if i in special:
            continue
        if all(c in dec for c in text) and (len(text) == 1 or text in made):
            ranks[bytes(dec[c] for c in text)] = i
        else:
            extra[i] = text
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"not a byte-level BPE vocabulary: no token for bytes {missing[:8]}")
    order = [vocab[a + b] for a, b in merges if a + b in vocab]
    late = sum(x > y for x, y in zip(order, order[1:]))
    if late:
        import warnings
        warnings.warn(f"{late} merges are listed after a merge with a higher id: tiktoken's rank order "
                      "may encode some words differently from the Hugging Face tokenizer")
    return ranks, extra


def _split_regex(pre):
    """The splitting regex of a tokenizer.json pre_tokenizer: Llama 3 and Qwen write a Split with their
    regex then a ByteLevel that splits no more; GPT-2 has a lone ByteLevel with GPT-2's regex built in."""
    if not pre:
        return None
    for p in pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]:
        if p.get("type") == "Split" and "Regex" in p.get("pattern", {}) and not p.get("invert"):
            return p["pattern"]["Regex"]
        if p.get("type") == "ByteLevel":
            if p.get("use_regex", True):
                return GPT2_PAT
        else:
            raise ValueError(f"pre-tokenizer {p.get('type')!r} has no tiktoken equivalent")
    return None


def has_hf_tokenizer(path):
    return any(os.path.exists(os.path.join(path, f)) for f in
               ("tokenizer.json", "vocab.json", "tokenizer.model", os.path.join("original", "tokenizer.model")))


def read_hf_tokenizer(path):
    """Read a Hugging Face folder's tokenizer as tiktoken ranks plus special tokens.

    Sources, first found: tokenizer.json (fast tokenizer); vocab.json + merges.txt (slow tokenizer);
    tokenizer.model in tiktoken's format (Meta's Llama 3 release, also under original/), whose 256
    special tokens are LLAMA3_SPECIALS. tokenizer_config.json adds special tokens and names the eos.
    eot: the eos token of tokenizer_config.json (<|eot_id|> / <|im_end|> for instruct models), else of
    config.json. BK: an id the checkpoint already has but never uses, so its table keeps its shape: the
    last <|reserved_special_token_N|> (Llama 3); else the id after the last token (Qwen's table has
    unused rows there; GPT-2's gets padded by the model loader). A config.json written by export_hf
    names it (backtrack_token_id). Returns dict(name, ranks, pat, special, eot_id, bk_id, bos_id, nfc).
    """
    def js(name):
        p = os.path.join(path, name)
        return read_json(p) if os.path.exists(p) else {}

    cfg, tcfg, tj = js("config.json"), js("tokenizer_config.json"), js("tokenizer.json")
    special, vocab, pat, nfc = {}, None, None, None
    if tj:
        m = tj.get("model") or {}
        if m.get("type") != "BPE" or m.get("byte_fallback"):
            raise ValueError(f"{path}/tokenizer.json: only byte-level BPE (Llama 3, Qwen, GPT-2) is supported, "
                             f"not {m.get('type')}{' with byte fallback (SentencePiece style)' if m.get('byte_fallback') else ''}")
        vocab, merges = m["vocab"], m.get("merges") or []
        special.update({a["id"]: a["content"] for a in tj.get("added_tokens") or []})
        pat = _split_regex(tj.get("pre_tokenizer"))
        nfc = "NFC" in json.dumps(tj.get("normalizer"))
    elif os.path.exists(os.path.join(path, "vocab.json")) and os.path.exists(os.path.join(path, "merges.txt")):
        vocab = js("vocab.json")
        with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
            merges = [l for l in f.read().split("\n") if l and not l.startswith("#version")]
    else:
        files = [os.path.join(path, f) for f in ("tokenizer.model", os.path.join("original", "tokenizer.model"))]
        files = [f for f in files if os.path.exists(f)]
        if not files:
            raise FileNotFoundError(f"no tokenizer.json, vocab.json + merges.txt or tokenizer.model in {path!r}")
        ranks = load_ranks(files[0])
        special = {len(ranks) + i: t for i, t in enumerate(LLAMA3_SPECIALS)}
        pat = LLAMA3_PAT
    special.update({int(i): a["content"] for i, a in (tcfg.get("added_tokens_decoder") or {}).items()})
    if vocab is not None:
        ranks, extra = byte_level_ranks(vocab, merges, special)
        special.update(extra)

    texts = set(special.values())
    mt = cfg.get("model_type", "")
    if "<|start_header_id|>" in texts or mt == "llama":
        name, default_pat = "llama3", LLAMA3_PAT
    elif "<|im_start|>" in texts or mt.startswith("qwen") or "Qwen" in str(tcfg.get("tokenizer_class")):
        name, default_pat = (mt if mt in ("qwen2", "qwen3") else "qwen2"), QWEN2_PAT
    else:
        name, default_pat = "gpt2", GPT2_PAT
    ids = {t: i for i, t in special.items()}

    def token_id(t):  # tokenizer_config.json gives a token as text or as {"content": text}
        return ids.get(t.get("content") if isinstance(t, dict) else t)

    eot = token_id(tcfg.get("eos_token"))
    if eot is None:
        e = cfg.get("eos_token_id")
        if isinstance(e, list):  # instruct models list several; the end-of-turn one stops a reply
            e = next((x for x in e if special.get(x) in ("<|eot_id|>", "<|im_end|>")), e[0] if e else None)
        eot = e if e is not None else ids.get("<|end_of_text|>" if name == "llama3" else EOT_TEXT)
    if eot is None:
        raise ValueError(f"{path}: no eos token in tokenizer_config.json or config.json")
    if "backtrack_token_id" in cfg:
        bk = cfg["backtrack_token_id"]
    elif BK_TEXT in ids:
        bk = ids[BK_TEXT]
    else:
        reserved = [i for i, t in special.items() if re.fullmatch(r"<\|reserved_special_token_\d+\|>", t)]
        bk = max(reserved) if reserved else max(max(ranks.values()), max(special, default=-1)) + 1
    special[bk] = BK_TEXT
    return dict(name=name, ranks=ranks, pat=pat or default_pat, special=special, eot_id=eot, bk_id=bk,
                bos_id=ids.get("<|begin_of_text|>") if name == "llama3" else None,
                nfc=name.startswith("qwen") if nfc is None else nfc)


def hf_tokenizer_ids(path):
    """eot_id, bk_id, n_vocab and path of a Hugging Face folder's tokenizer, for the model loader, so
    model and tokenizer agree; None when the folder has no tokenizer (or one this file cannot read)."""
    if not has_hf_tokenizer(path):
        return None
    try:
        s = read_hf_tokenizer(path)
    except ValueError as e:
        import warnings
        warnings.warn(f"{path}: tokenizer ignored ({e})")
        return None
    n = max(max(s["ranks"].values()), max(s["special"])) + 1
    return dict(eot_id=s["eot_id"], bk_id=s["bk_id"], n_vocab=n, path=os.path.abspath(path))


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)

# chat templates: one user turn, ending where the assistant's reply begins


def chat_family(tok_or_family):
    """'llama3' or 'chatml' (Qwen) from a Tokenizer (by its special tokens) or a family name."""
    x = tok_or_family
    if isinstance(x, Tokenizer):
        texts = set(x.special.values())
        if "<|start_header_id|>" in texts:
            return "llama3"
        if "<|im_start|>" in texts:
            return "chatml"
        x = x.name
    x = str(x).lower()
    if x.startswith("llama"):
        return "llama3"
    if x.startswith("qwen") or x == "chatml":
        return "chatml"
    raise ValueError(f"no chat template for {x!r}: expected a Llama 3 or Qwen tokenizer or family name")


def chat_parts(tok_or_family, question, system=None):
    """[(text, is_marker)] of one user turn. Text between two markers is one piece, because a
    Hugging Face tokenizer splits the rendered template at its special tokens before encoding."""
    M = lambda t: (t, True)
    if chat_family(tok_or_family) == "llama3":  # Llama 3 trims each message
        turn = lambda role, text: [M("<|start_header_id|>"), (role, False), M("<|end_header_id|>"),
                                   ("\n\n" + text.strip(), False), M("<|eot_id|>")]
        head = [M("<|begin_of_text|>")] + (turn("system", system) if system is not None else [])
        return head + turn("user", question) + [M("<|start_header_id|>"), ("assistant", False),
                                                M("<|end_header_id|>"), ("\n\n", False)]
    turn = lambda role, text: [M("<|im_start|>"), (f"{role}\n{text}", False), M("<|im_end|>"), ("\n", False)]
    head = turn("system", system) if system is not None else []
    return head + turn("user", question) + [M("<|im_start|>"), ("assistant\n", False)]


def chat_prompt(tok_or_family, question, system=None):
    """The text an instruct model of this family expects before its answer: Llama 3 headers closed by
    <|eot_id|>, or ChatML (<|im_start|>role ... <|im_end|>) for Qwen. No system turn unless given
    (Qwen2/2.5's own templates add a default one; pass it as `system` to match them exactly).
    Turn it into ids with chat_ids: `encode` keeps the markers as plain text, by design."""
    return "".join(t for t, _ in chat_parts(tok_or_family, question, system))


def chat_ids(tok, question, system=None):
    """chat_prompt as ids: markers by their ids, the question and system text through encode, so a
    marker typed inside the question stays ordinary text."""
    ids = {t: i for i, t in tok.special.items()}
    out = []
    for text, marker in chat_parts(tok, question, system):
        if marker and text not in ids:
            raise ValueError(f"tokenizer {tok.name!r} has no {text} token")
        out += [ids[text]] if marker else tok.encode(text)
    return out

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

# -----------------------------------------------------------------------------
# answers: the one parser that rewards and evaluation share

import difflib
import hashlib
import unicodedata
from fractions import Fraction

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")


def normalize_number(s):
    """Canonical text of a number: '1,000' -> '1000', '$3.50' -> '3.5', '-0' -> '0', '+7.' -> '7'.
    None if s is not a plain number (no units, no words: the verifiers are exact)."""
    s = s.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if not _NUMBER.fullmatch(s):
        return None
    sign = "-" if s[0] == "-" else ""
    whole, _, frac = s.lstrip("+-").partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    if whole == "0" and not frac:
        sign = ""  # -0 is 0
    return sign + whole + ("." + frac if frac else "")


def parse_answer(text):
    """The final answer of a response: the number on the line after the last '####' (text after an
    end-of-text marker is ignored), normalized by normalize_number; None when absent or not a number."""
    if text is None:
        return None
    text = text.split(EOT_TEXT)[0]
    if "####" not in text:
        return None
    return normalize_number(text.rsplit("####", 1)[1].split("\n")[0])


def response_lines(text):
    """Non-empty, stripped lines of a response, up to end-of-text."""
    return [l.strip() for l in text.split(EOT_TEXT)[0].split("\n") if l.strip()]


def _bucket(text, n=10):
    # a stable hash (Python's hash() is salted per process): splits must not change between runs
    return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) % n

# -----------------------------------------------------------------------------
# tasks: generators or loaders, prompt formats and exact verifiers
#
# A problem is a dict with at least 'question', 'answer' (canonical, as parse_answer returns it) and
# 'solution' (the clean response text, without end-of-text, ending in a '#### <answer>' line).
# The response follows task.prompt(problem) directly.


class Task:
    name = "task"

    def problems(self, split, n=None, seed=0):
        raise NotImplementedError

    def prompt(self, p):
        return p["question"] + "\n"

    def verify(self, text, p):
        return parse_answer(text) == p["answer"]

    def steps(self, text, p):
        return []

    def slip(self, p, rng):
        """A plausible wrong solution of p (text), or None: material for lcs augmentation."""
        return None

    def is_test(self, p):
        return False

    def check_train(self, problems):
        """Raise if any problem belongs to the test split: training data must never contain one."""
        bad = [p["question"] for p in problems if self.is_test(p)]
        if bad:
            raise ValueError(f"{self.name}: {len(bad)} test problem(s) in training data, e.g. {bad[0][:80]!r}")


def _apply(op, a, b):
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op in "*x×":
        return a * b
    if op in "/÷":
        return a / b  # callers pass Fractions; b == 0 raises ZeroDivisionError
    raise ValueError(f"unknown operator {op!r}")


class SyntheticTask(Task):
    """A task whose problems are drawn by self._make(rng). Splits: a question is 'test' iff a
    stable hash of it falls in the test bucket (1 in 10), so train and test are disjoint whatever
    the seeds; the test set holds distinct questions, while training may repeat one."""

    def problems(self, split, n=None, seed=0):
        assert split in ("train", "test"), f"unknown split {split!r}"
        n = self.n_default[split] if n is None else n
        rng = random.Random(f"{self.name}:{split}:{seed}")
        out, seen = [], set()
        for _ in range(100 * n + 1000):
            if len(out) == n:
                break
            p = self._make(rng)
            if self.is_test(p) != (split == "test") or (split == "test" and p["question"] in seen):
                continue
            seen.add(p["question"])
            out.append(p)
        return out

    def is_test(self, p):
        return _bucket(p["question"]) == 0


class Arith(SyntheticTask):
    """Multi-step arithmetic on a running total, for tiny models trained from scratch.

    question '3+5-2+7', response '3+5=8\\n8-2=6\\n6+7=13\\n#### 13'. Every step reads the previous
    result and the next operand and is computable on its own; totals stay in [0, max_value], so
    the numbers in a step are short (about 45 byte tokens per example).

    Measured with a 1.8M-parameter GPT (4 layers, 192 wide, byte tokens), batch 32, AdamW 1e-3
    cosine over 2000 steps, clean traces, greedy accuracy on 200 test problems:
      defaults (1-digit operands, 2-4 steps):  11% @250 steps, 48% @500, 94% @1000, 100% @2000
      digits=2 (2-digit operands):              1% @500,  43% @1000, 69% @1500,  80% @2000
      defaults, half the traces with plausible errors (<= 4 BKs, masked):
                                               25% @500,  78% @1000, 90% @1500,  98% @2000
    A step is ~0.12 s on 2 idle CPU cores, so the defaults are learned in ~2 minutes; digits=2
    (or more steps) leaves room for errors that backtracking can fix.
    Splits: a question is 'test' iff a stable hash of it falls in the test bucket (1 in 10), so
    train and test are disjoint whatever the seeds.
    """
    name = "arith"

    def __init__(self, min_steps=2, max_steps=4, digits=1, ops="+-", max_value=99, n_train=20000, n_test=500,
                 steps=None):
        if steps is not None:  # shorthand: exactly this many steps
            min_steps = max_steps = int(steps)
        assert 1 <= min_steps <= max_steps and digits >= 1 and set(ops) <= set("+-*"), "bad arith settings"
        self.min_steps, self.max_steps, self.digits, self.ops = min_steps, max_steps, digits, ops
        self.max_value, self.n_default = max_value, dict(train=n_train, test=n_test)
        self.lo, self.hi = (1 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
        assert self.hi <= max_value, "max_value must hold an operand"

    def _make(self, rng):
        total = rng.randint(self.lo, self.hi)
        nums, ops = [total], []
        for _ in range(rng.randint(self.min_steps, self.max_steps)):
            for _ in range(100):  # redraw until the running total stays in range
                op, b = rng.choice(self.ops), rng.randint(self.lo, self.hi)
                if 0 <= _apply(op, total, b) <= self.max_value:
                    break
            else:
                op, b = "-", min(total, self.hi)
            total = _apply(op, total, b)
            nums.append(b); ops.append(op)
        return self.problem(nums, ops)

    def problem(self, nums, ops):
        q = str(nums[0]) + "".join(op + str(b) for op, b in zip(ops, nums[1:]))
        lines, total = [], nums[0]
        for op, b in zip(ops, nums[1:]):
            c = _apply(op, total, b)
            lines.append(f"{total}{op}{b}={c}")
            total = c
        lines.append(f"#### {total}")
        return dict(question=q, answer=str(total), solution="\n".join(lines), nums=nums, ops=ops)

    _STEP = re.compile(r"(-?\d+)([-+*])(\d+)=(-?\d+)")

    def steps(self, text, p):
        """Per step line: it applies the problem's next operation to the previous line's result
        (the first number for line 1) and the arithmetic is right. A line that is not a step, or
        one too many, is a wrong step."""
        out, prev = [], p["nums"][0]
        for k, line in enumerate(l for l in response_lines(text) if not l.startswith("####")):
            m = self._STEP.fullmatch(line)
            if not m or k >= len(p["ops"]):
                out.append(False); prev = None
                continue
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            out.append(a == prev and op == p["ops"][k] and b == p["nums"][k + 1] and _apply(op, a, b) == c)
            prev = c
        return out

    def slip(self, p, rng):
        """One step's result off by a little, and the steps after it carried on from the wrong total."""
        nums, ops = p["nums"], p["ops"]
        k = rng.randrange(len(ops))
        lines, total = [], nums[0]
        for i, (op, b) in enumerate(zip(ops, nums[1:])):
            c = _apply(op, total, b)
            if i == k:
                c = c + rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if c + d >= 0])
            lines.append(f"{total}{op}{b}={c}")
            total = c
        lines.append(f"#### {total}")
        return "\n".join(lines)


_VALUE = r"(\(\s*-?\d+\s*/\s*\d+\s*\)|-?\d+(?:\.\d+)?)"
_CD_STEP = re.compile(rf"{_VALUE}\s*([-+*/x×÷])\s*{_VALUE}\s*=\s*{_VALUE}")


def _value(s):
    s = s.strip().strip("()").replace(" ", "")
    return Fraction(s)  # '7/2', '-3', '2.5' are all exact


class Countdown(SyntheticTask):
    """Reach a target from n_numbers numbers with + - * /, each number used at most once.

    question 'make 29 from 3 7 8', response '3*8=24\\n24+7=31\\n...#### 29'. Arithmetic is exact
    (Fractions); a non-integer intermediate is written '(7/2)'. verify accepts any valid solution:
    every step uses two values still available (given numbers, or results of earlier steps, each
    once) and computes them right, and the last step's result is the target.
    """
    name = "countdown"

    def __init__(self, n_numbers=3, max_number=20, max_target=100, ops="+-*/", n_train=20000, n_test=500):
        assert n_numbers >= 2 and set(ops) <= set("+-*/"), "bad countdown settings"
        self.n_numbers, self.max_number, self.max_target, self.ops = n_numbers, max_number, max_target, ops
        self.n_default = dict(train=n_train, test=n_test)

    def _make(self, rng):
        while True:
            nums = [rng.randint(1, self.max_number) for _ in range(self.n_numbers)]
            pool, lines = list(nums), []
            ok = True
            while len(pool) > 1:  # combine two random values until one is left: all numbers used
                a = pool.pop(rng.randrange(len(pool)))
                b = pool.pop(rng.randrange(len(pool)))
                op = rng.choice(self.ops)
                if op == "-" and a < b:
                    a, b = b, a  # generated solutions stay positive and in integers
                if op == "/" and (b <= 1 or a % b):
                    op = "+"
                c = int(_apply(op, Fraction(a), Fraction(b)))
                lines.append(f"{a}{op}{b}={c}")
                pool.append(c)
                ok = ok and c > 0
            t = pool[0]
            if ok and 1 <= t <= self.max_target and t not in nums:
                q = f"make {t} from " + " ".join(map(str, nums))
                return dict(question=q, answer=str(t), solution="\n".join(lines + [f"#### {t}"]), nums=nums, target=t)

    def _walk(self, text, p):
        """(per-step validity, value of the last step, well_formed). A response is well formed when
        it is step lines, then one '####' line, then nothing."""
        lines = response_lines(text)
        ends = [i for i, l in enumerate(lines) if l.startswith("####")]
        well_formed = len(ends) == 1 and ends[0] == len(lines) - 1
        pool = [Fraction(x) for x in p["nums"]]
        ok, last = [], None
        for line in lines[:ends[-1] if ends else len(lines)]:
            m = _CD_STEP.fullmatch(line)
            if not m:
                ok.append(False)
                well_formed = False
                continue
            a, op, b, c = _value(m[1]), m[2], _value(m[3]), _value(m[4])
            good = False
            if a in pool:
                pool.remove(a)
                if b in pool:
                    pool.remove(b)
                    try:
                        good = _apply(op, a, b) == c
                    except ZeroDivisionError:
                        pass
                    if not good:
                        pool.append(b)
                if not good:
                    pool.append(a)
            if good:
                pool.append(c)
                last = c
            ok.append(good)
        return ok, last, well_formed

    def verify(self, text, p):
        if parse_answer(text) != p["answer"]:
            return False
        ok, last, well_formed = self._walk(text, p)
        return well_formed and bool(ok) and all(ok) and last == Fraction(p["target"])

    def steps(self, text, p):
        return self._walk(text, p)[0]

    def slip(self, p, rng):
        """The reference solution with one step's result off by one (later steps left as they were)."""
        lines = p["solution"].split("\n")[:-1]
        k = rng.randrange(len(lines))
        m = _CD_STEP.fullmatch(lines[k])
        lines[k] = f"{m[1]}{m[2]}{m[3]}={int(_value(m[4])) + rng.choice((-1, 1))}"
        return "\n".join(lines + [f"#### {p['answer']}"])


def read_jsonl(path, fields=()):
    """(line number, row) for each row of a JSONL file. A malformed line, or a row missing a field, raises ValueError naming
    the file and the line, so a bad data file fails loudly instead of training on less."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object")
            for k in fields:
                if not isinstance(row.get(k), str):
                    raise ValueError(f"{path}:{i}: missing or non-string field {k!r}")
            rows.append((i, row))
    return rows


def normalize_question(q):
    """Question text for leak checks: unicode-folded, lowercased, whitespace collapsed."""
    q = unicodedata.normalize("NFKC", q).replace("\u2019", "'").replace("\u2018", "'")
    return " ".join(q.lower().split())


_CALC = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
_NUM_TXT = r"\$?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)%?"
_EQ_TXT = re.compile(rf"(?<![\d.])((?:\(\s*)*{_NUM_TXT}(?:\s*\))*(?:\s*[-+*/x×÷]\s*(?:\(\s*)*{_NUM_TXT}(?:\s*\))*)+)"
                     rf"\s*=\s*(-?{_NUM_TXT})")


def eval_expr(s):
    """Exact value (Fraction) of an arithmetic expression: numbers (with $ , %), + - * / x ( )."""
    toks = re.findall(r"(?:\d+(?:\.\d*)?|\.\d+)%?|[-+*/x×÷()]", s.replace(",", "").replace("$", ""))
    if "".join(toks) != re.sub(r"\s", "", s.replace(",", "").replace("$", "")):
        raise ValueError(f"not an arithmetic expression: {s!r}")
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else None

    def take():
        nonlocal pos
        pos += 1
        return toks[pos - 1]

    def atom():
        t = take() if peek() is not None else None
        if t == "(":
            v = expr()
            if take() != ")":
                raise ValueError("unbalanced parentheses")
            return v
        if t in ("-", "+"):
            return -atom() if t == "-" else atom()
        if t is None or not (t[0].isdigit() or t[0] == "."):
            raise ValueError(f"expected a number in {s!r}")
        return Fraction(t[:-1]) / 100 if t.endswith("%") else Fraction(t)

    def term():
        v = atom()
        while peek() in ("*", "/", "x", "×", "÷"):
            v = _apply(take(), v, atom())
        return v

    def expr():
        v = term()
        while peek() in ("+", "-"):
            v = _apply(take(), v, term())
        return v

    try:
        v = expr()
    except IndexError:
        raise ValueError(f"incomplete expression {s!r}") from None
    if pos != len(toks):
        raise ValueError(f"trailing tokens in {s!r}")
    return v


def check_equation(expr, value):
    """expr evaluates to value; a value written with d decimals may be rounded to d decimals.
    'x = 75%' is right whether x is 75 or 0.75 (both ways of writing a percentage occur)."""
    v = normalize_number(value.replace("%", ""))
    if v is None:
        return False
    try:
        got = eval_expr(expr)
    except (ValueError, ZeroDivisionError):
        return False
    tol = Fraction(1, 2 * 10 ** len(v.partition(".")[2]))
    wants = [Fraction(v)] + ([Fraction(v) / 100] if value.strip().endswith("%") else [])
    return any(abs(got - w) <= tol for w in wants)


class GSM8K(Task):
    """Grade-school math word problems from JSONL rows with 'question' and 'answer' (the reasoning,
    then '#### <final answer>').

    calc='strip' drops the <<a*b=c>> calculator annotations from the solution text, 'keep' keeps
    them. The training split drops (and counts in self.dropped) any question whose normalized text
    is in the test file, and check_train raises if one gets in another way.
    """
    name = "gsm8k"

    def __init__(self, path=None, data_dir=None, calc="strip", test_path=None):
        assert calc in ("strip", "keep"), f"calc must be 'strip' or 'keep', not {calc!r}"
        self.calc = calc
        d = data_dir or (path if path and os.path.isdir(path) else None)
        d = d or os.path.join(REPO_DIR, "..", "shared", "data", "gsm8k")
        self.file = path if path and not os.path.isdir(path) else None  # one file for every split
        self.data_dir = d
        self.test_path = test_path or os.path.join(d, "test.jsonl")
        self.dropped = 0
        self._test_questions = None

    def solution_text(self, answer):
        body, _, final = answer.rpartition("####")
        body = body.strip()
        if self.calc == "strip":
            body = _CALC.sub("", body)
        return body, normalize_number(final)

    def problems(self, split, n=None, seed=0):
        assert split in ("train", "test"), f"unknown split {split!r}"
        path = self.file or os.path.join(self.data_dir, f"{split}.jsonl")
        out = []
        for i, row in read_jsonl(path, fields=("question", "answer")):
            body, ans = self.solution_text(row["answer"])
            if "####" not in row["answer"] or ans is None:
                raise ValueError(f"{path}:{i}: answer has no '#### <number>' line")
            out.append(dict(question=row["question"].strip(), answer=ans,
                            solution=(body + "\n" if body else "") + f"#### {ans}", line=i))
        if split == "train":
            n0 = len(out)
            out = [p for p in out if not self.is_test(p)]
            self.dropped = n0 - len(out)
        if n is not None and n < len(out):
            out = random.Random(f"{self.name}:{split}:{seed}").sample(out, n)
        return out

    def is_test(self, p):
        if self._test_questions is None:
            if not os.path.exists(self.test_path):  # nothing to check against (a custom data set)
                self._test_questions = set()
            else:
                rows = read_jsonl(self.test_path, fields=("question",))
                self._test_questions = {normalize_question(r["question"]) for _, r in rows}
        return normalize_question(p["question"]) in self._test_questions

    def prompt(self, p):
        return f"Question: {p['question']}\nAnswer:\n"

    def steps(self, text, p):
        """One bool per equation: each <<expr=value>> annotation when the text has them, else each
        'a op b = c' written in the text, evaluated exactly (c may be rounded to its decimals)."""
        text = text.split(EOT_TEXT)[0].rsplit("####", 1)[0]
        if _CALC.search(text):
            return [check_equation(e, v) for e, v in _CALC.findall(text)]
        return [check_equation(e, v) for e, v in _EQ_TXT.findall(text)]

    def slip(self, p, rng):
        """The solution with one computed result (after '=') replaced by a near miss."""
        sol = p["solution"]
        spots = [m for m in re.finditer(r"=\s*\$?(\d+)", sol)]
        if not spots:
            return None
        m = rng.choice(spots)
        v = int(m[1])
        w = v + rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if v + d >= 0])
        return sol[:m.start(1)] + str(w) + sol[m.end(1):]


def example_solution_pairs(path=None, calc="strip"):
    """(question, wrong, right) from example_model_solutions.jsonl: every model solution marked
    incorrect, paired with the ground truth, both rewritten in the gsm8k solution format (the
    final 'A: N' line becomes '#### N'; calc annotations stripped or kept). These are GSM8K *test*
    questions: material for measuring and testing the lcs augmentation, never for training."""
    path = path or os.path.join(REPO_DIR, "..", "shared", "data", "gsm8k", "example_model_solutions.jsonl")

    def fmt(s):
        s = s.strip()
        if calc == "strip":
            s = _CALC.sub("", s)
        lines = s.split("\n")
        if lines and lines[-1].startswith("A:"):
            a = normalize_number(lines[-1][2:]) or lines[-1][2:].strip()
            lines[-1] = f"#### {a}"
        return "\n".join(lines)

    out = []
    for i, row in read_jsonl(path, fields=("question", "ground_truth")):
        for k, v in row.items():
            if isinstance(v, dict):
                if not isinstance(v.get("solution"), str) or "is_correct" not in v:
                    raise ValueError(f"{path}:{i}: {k!r} needs 'solution' and 'is_correct'")
                if not v["is_correct"]:
                    out.append((row["question"], fmt(v["solution"]), fmt(row["ground_truth"])))
    return out


TASKS = dict(arith=Arith, countdown=Countdown, gsm8k=GSM8K)


def get_task(name="arith", **kw):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: expected one of {sorted(TASKS)}")
    return TASKS[name](**kw)


def checkpoint_task(meta, name="", kwargs=None):
    """The task a later stage works on: `name`/`kwargs` when given, else the one the checkpoint
    was trained on (its settings kept only when the task is the same). Returns (name, kwargs, task)."""
    name = name or meta.get("task", "arith")
    if kwargs is None:
        kwargs = meta.get("task_kwargs", {}) if name == meta.get("task") else {}
    return name, kwargs, get_task(name, **kwargs)

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
    wrong response lacks is simply written (nothing to undo)."""
    wrong, right = list(wrong_ids), list(right_ids)
    assert bk_id not in wrong and bk_id not in right, "inputs are plain responses"
    sm = difflib.SequenceMatcher(None, wrong, right, autojunk=False)  # autojunk would skip common tokens
    out, n_div, n_bk = [], 0, 0
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        k = i2 - i1
        if tag != "equal" and k > 0 and (max_divergences is None or n_div < max_divergences) \
                and (max_backtracks is None or n_bk + k <= max_backtracks):
            out += wrong[i1:i2] + [bk_id] * k
            n_div += 1
            n_bk += k
        out += right[j1:j2]
    return out


def random_vocab(tok):
    """Ids for uniform random errors: printable ASCII (and newline) for bytes, all of BPE."""
    if getattr(tok, "name", None) == "byte":
        return [10] + list(range(32, 127))
    special = set(getattr(tok, "special", {})) | {tok.eot_id, tok.bk_id}
    return [i for i in range(tok.n_vocab) if i not in special]


AUGMENTS = ("plausible", "random", "lcs")


def build_traces(tok, task, problems, rng, backtrack_ratio=0.5, max_backtracks=8, augment="plausible",
                 n_errors=(1, 2), error_len=(1, 3), allow_test=False):
    """Training traces: prompt ids = tok.encode(task.prompt(p)); response = the clean solution ids
    plus end-of-text, augmented with backtracks for a backtrack_ratio share of the problems.

    augment: 'plausible' (near-miss errors), 'random' (uniform tokens), 'lcs' (align a wrong
    solution with the right one: p['wrong'], a str or list of str, when the problem carries one,
    else task.slip), 'mixed' (one of those per trace), or a list of names to pick from.
    max_backtracks caps the BKs of any trace (0: every trace is clean). Where an augmentation finds
    nothing to do (no wrong solution, no plausible spot) the trace falls back to plausible, then
    random, injection. Refuses test-split problems unless allow_test.
    """
    if not allow_test:
        task.check_train(problems)
    kinds = AUGMENTS if augment == "mixed" else (augment,) if isinstance(augment, str) else tuple(augment)
    for k in kinds:
        assert k in AUGMENTS, f"unknown augmentation {k!r}: expected one of {AUGMENTS} or 'mixed'"
    bk, eot = tok.bk_id, tok.eot_id
    chosen = set(rng.sample(range(len(problems)), round(backtrack_ratio * len(problems))))
    sampler = plausible_sampler(tok)
    vocab = random_vocab(tok)
    traces = []
    for i, p in enumerate(problems):
        prompt = tok.encode(task.prompt(p))
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
            n = _span(n_errors, rng)
            if bk not in resp and kind in ("lcs", "plausible"):
                resp = inject_random(clean, bk, rng, n, sampler=sampler, eot_id=eot, max_backtracks=max_backtracks)
                kind = "plausible"
            if bk not in resp:
                resp = inject_random(clean, bk, rng, n, error_len=error_len, vocab=vocab, eot_id=eot,
                                     max_backtracks=max_backtracks)
                kind = "random"
        assert resolve(resp, bk) == clean, "an augmentation broke resolve(trace) == clean"
        traces.append(Trace(prompt, resp, meta=dict(augment=kind, n_bk=count_backtracks(resp, bk), index=i)))
    return traces

# -----------------------------------------------------------------------------
# curriculum (notes 7.2): how many backtracks a training trace may hold, by training progress


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
        cap = self.phases[0][1]
        for start, m in self.phases:
            if progress >= start:
                cap = m
        return cap

    def __str__(self):
        return ",".join(f"{s:g}:{'none' if m is None else m}" for s, m in self.phases)
