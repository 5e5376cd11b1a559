"""
Tokenizers: tiktoken encodings with the two special tokens every model here knows, end-of-text and
<|BACKTRACK|> (BK), read from the byte vocabulary, GPT-2's BPE ranks or a Hugging Face folder
(Llama 3, Qwen2/Qwen3, GPT-2), and the chat templates of instruct models.

Ids are what every other file works in: a trace is built, resolved and scored in token ids, never
by editing text (docs/backtrack-semantics.md §1). `encode` never produces a special token from
user text, so a typed "<|BACKTRACK|>" is ordinary text; only code adds BK, end-of-text and chat
markers.
"""
import json
import os
import re

from hf import read_json

BK_TEXT = "<|BACKTRACK|>"
EOT_TEXT = "<|endoftext|>"
# GPT-2's BPE ranks ship with the repository (assets/, MIT licence beside them): no download needed
GPT2_RANKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "gpt2.tiktoken")
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
    name='gpt2': GPT-2 BPE from the ranks file in assets/ (id = rank), or GPT2_TIKTOKEN=/path.
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
            path = path or os.environ.get("GPT2_TIKTOKEN", GPT2_RANKS)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"gpt2 ranks file not found: {path} (the repository ships one in assets/; "
                                        "GPT2_TIKTOKEN=/path overrides it)")
            ranks = load_ranks(path)
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


# -----------------------------------------------------------------------------
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
