"""
Tokenizers: tiktoken encodings with the two special tokens every model here knows, end-of-text and
<|BACKTRACK|> (BK), read from the byte vocabulary, GPT-2's BPE ranks or a Hugging Face folder
(Llama 3, Qwen2/Qwen3, GPT-2), the end ids a checkpoint declares, the chat templates of instruct
models, rendered the way `transformers` renders them, and the tokenizer files a checkpoint or an
export carries.

Ids are what every other file works in: a trace is built, resolved and scored in token ids, never
by editing text (docs/backtrack-semantics.md §1). `encode` never produces a special token from
user text, so a typed "<|BACKTRACK|>" is ordinary text; only code adds BK, end-of-text and chat
markers (a chat template's markers come from the template, never from the messages).
"""
import functools
import json
import os
import re
import shutil

from common import read_json

BK_TEXT = "<|BACKTRACK|>"
EOT_TEXT = "<|endoftext|>"
# what a Hugging Face folder's tokenizer is made of (read below; checkpoints and exports
# carry copies). generation_config.json is written, not copied: see copy_tokenizer_files.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")

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

    stop_ids: every id that ends a reply, eot first, then each eos_token_id the folder declares
    (generation_config.json, config.json): Llama 3 instruct stops on <|eot_id|>, <|eom_id|> and
    <|end_of_text|>, Qwen on <|im_end|> and <|endoftext|>. chat_template: the folder's own (None
    elsewhere); chat: whether prompts are rendered with it (tasks.prompt_ids), on by default when
    there is one, off with chat=False.
    """

    def __init__(self, name="byte", path=None, chat=True):
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
        self.stop_ids = spec.get("stop_ids") or [self.eot_id]
        self.chat_template = spec.get("chat_template")      # jinja source, or None
        self.template_vars = spec.get("template_vars", {})  # bos_token, eos_token, ... as templates see them
        self.chat = bool(chat) and self.chat_template is not None

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

    def chat_ids(self, messages, system=None):
        """The ids of a conversation rendered with the folder's chat template, as transformers'
        apply_chat_template(messages, add_generation_prompt=True, tokenize=True) gives them: the
        template's text split at special and added tokens, each one the template writes becoming its
        id and the text between going through encode. messages: a str (one user turn) or a list of
        {"role", "content"} dicts; system: a system turn put first. Special-token text inside a
        message stays ordinary text (transformers' sanitize_control_tokens=True)."""
        if self.chat_template is None:
            raise ValueError(f"tokenizer {self.path or self.name!r} has no chat template (tokenizer_config.json "
                             "'chat_template', chat_template.jinja or chat_template.json): prompts stay plain")
        if isinstance(messages, str):
            messages = [dict(role="user", content=messages)]
        if system is not None:
            messages = [dict(role="system", content=system)] + list(messages)
        texts = tuple(sorted(set(self.special.values()), key=len, reverse=True))
        specials, marked = _special_patterns(texts)
        text = render_chat(self.chat_template, _mark(messages, specials), self.template_vars)
        ids, ends = [], {t: i for i, t in self.special.items()}
        pos = 0
        for m in marked.finditer(text):
            ids += self.encode(text[pos:m.start()])
            if m["typed"] is not None:       # typed by a user: text, encoded on its own
                ids += self.encode(m["typed"])
            elif m["special"] is not None:   # written by the template
                ids.append(ends[m["special"]])
            pos = m.end()                    # a lone marker (a template split a typed token) breaks the text
        return ids + self.encode(text[pos:])


def get_tokenizer(name, path=None, chat=True):
    """'byte', 'gpt2' (path: its ranks file), or a Hugging Face folder given as path or as name.
    chat=False: prompts stay plain even when the folder has a chat template (Tokenizer.chat)."""
    if path is None and name not in ("byte", "gpt2") and os.path.isdir(str(name)):
        name, path = None, name
    return Tokenizer(name, path, chat=chat)


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


def read_vocab(path, tj, tcfg):
    """A Hugging Face folder's vocabulary as tiktoken ranks and special tokens, from the first of
    tokenizer.json (tj, parsed), vocab.json + merges.txt, or a tiktoken tokenizer.model; with the
    added tokens tokenizer_config.json (tcfg) declares. Returns (ranks, special, pat, nfc): pat and
    nfc None where the files do not say (the family's default then applies)."""
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
        vocab = read_json(os.path.join(path, "vocab.json"))
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
    return ranks, special, pat, nfc


def read_hf_tokenizer(path):
    """Read a Hugging Face folder's tokenizer as tiktoken ranks plus special tokens.

    Sources, first found: tokenizer.json (fast tokenizer); vocab.json + merges.txt (slow tokenizer);
    tokenizer.model in tiktoken's format (Meta's Llama 3 release, also under original/), whose 256
    special tokens are LLAMA3_SPECIALS. tokenizer_config.json adds special tokens and names the eos.
    eot: the eos token of tokenizer_config.json (<|eot_id|> / <|im_end|> for instruct models), else of
    config.json. BK: an id the checkpoint already has but never uses, so its table keeps its shape: the
    last <|reserved_special_token_N|> (Llama 3); else the id after the last token (Qwen's table has
    unused rows there; GPT-2's gets padded by the model loader). A config.json written by export_hf
    names it (backtrack_token_id); so does the config.json of a checkpoint of this project that carries
    its tokenizer files (its eot_id and bk_id). stop_ids: eot, then every end id the folder declares
    (declared_eos_ids). chat_template: the folder's own, read as transformers reads it
    (chat_template.jinja, else tokenizer_config.json's "chat_template", its "default" when it holds
    several; else chat_template.json); template_vars: the named special tokens (bos_token, eos_token,
    ...) a template sees. Returns dict(name, ranks, pat, special, eot_id, bk_id, bos_id, nfc, stop_ids,
    chat_template, template_vars).
    """
    def js(name):
        p = os.path.join(path, name)
        return read_json(p) if os.path.exists(p) else {}

    cfg, tcfg, tj = js("config.json"), js("tokenizer_config.json"), js("tokenizer.json")
    if cfg.get("format") == "backtrack-gpt":   # a checkpoint of this project: its own ids decide
        cfg = dict(eos_token_id=cfg["config"]["eot_id"], backtrack_token_id=cfg["config"]["bk_id"])
    ranks, special, pat, nfc = read_vocab(path, tj, tcfg)

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
    n = max(max(ranks.values()), max(special)) + 1
    stops = [eot] + [i for i in declared_eos_ids(path) if i not in (eot, bk) and 0 <= i < n]
    template_vars = {}
    for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        t = tcfg.get(k) or js("special_tokens_map.json").get(k)
        t = t.get("content") if isinstance(t, dict) else t
        if isinstance(t, str):
            template_vars[k] = t
    return dict(name=name, ranks=ranks, pat=pat or default_pat, special=special, eot_id=eot, bk_id=bk,
                bos_id=ids.get("<|begin_of_text|>") if name == "llama3" else None,
                nfc=name.startswith("qwen") if nfc is None else nfc, stop_ids=stops,
                chat_template=read_chat_template(path, tcfg), template_vars=template_vars)


def read_chat_template(path, tcfg=None):
    """A folder's chat template (jinja source) or None: chat_template.jinja, which transformers lets win,
    else tokenizer_config.json's "chat_template" (a list of named templates: the "default" one), else
    chat_template.json (a processor's)."""
    f = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(f):
        with open(f, encoding="utf-8") as fh:
            return fh.read()
    if tcfg is None:
        tc = os.path.join(path, "tokenizer_config.json")
        tcfg = read_json(tc) if os.path.exists(tc) else {}
    t = tcfg.get("chat_template")
    f = os.path.join(path, "chat_template.json")
    if t is None and os.path.isfile(f):
        t = read_json(f).get("chat_template")
    if isinstance(t, list):
        t = {x["name"]: x["template"] for x in t}
    if isinstance(t, dict):
        t = t.get("default")
    return t if isinstance(t, str) and t else None


def hf_tokenizer_ids(path):
    """eot_id, bk_id, n_vocab and path of a Hugging Face folder's tokenizer, for the model loader, so
    model and tokenizer agree; None when the folder has no tokenizer (or one this file cannot read)."""
    if not has_tokenizer_files(path):
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
# chat templates: the folder's own jinja, rendered as transformers renders it


@functools.lru_cache(maxsize=8)
def _compile(template):
    """transformers' environment: sandboxed (templates come from the Hub), trim_blocks and
    lstrip_blocks, loop controls, {% generation %} blocks (rendered as their body), a tojson that keeps
    non-ASCII and HTML characters, raise_exception and strftime_now."""
    import datetime

    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):   # transformers tracks assistant spans with it; the text is the body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(template, messages, variables=None, add_generation_prompt=True):
    """The text of a conversation under a chat template, with the generation prompt (the assistant's
    header) at the end: what transformers' apply_chat_template(..., tokenize=False) returns. Keys of
    a message whose value is None are dropped first, as transformers does; variables are the named
    special tokens (Tokenizer.template_vars: bos_token, eos_token, ...)."""
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return _compile(template).render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **(variables or {}))


# A special token's text typed inside a message is wrapped in these private-use markers before
# rendering, so that splitting the rendered text can tell it from the markers the template writes.
_OPEN, _CLOSE = "\ue000", "\ue001"


@functools.lru_cache(maxsize=8)
def _special_patterns(texts):
    """(any special token's text; the rendered text's split points: a marked typed token, a lone
    marker, or a special token the template wrote), longest token first."""
    alt = "|".join(map(re.escape, texts)) or "(?!)"
    return re.compile(alt), re.compile(f"{_OPEN}(?P<typed>{alt}){_CLOSE}|[{_OPEN}{_CLOSE}]|(?P<special>{alt})")


def _mark(x, specials):
    if isinstance(x, str):
        x = x.replace(_OPEN, "").replace(_CLOSE, "")   # markers typed by a user cannot forge a token
        return specials.sub(lambda m: _OPEN + m[0] + _CLOSE, x)
    if isinstance(x, dict):
        return {k: _mark(v, specials) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_mark(v, specials) for v in x]
    return x

# -----------------------------------------------------------------------------
# the tokenizer files of a Hugging Face folder: which files make one, the end ids it declares, and
# how a checkpoint or an export carries them (with <|BACKTRACK|> written in)


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


def declared_eos_ids(path):
    """Every end id a folder declares: eos_token_id (an int or a list) of generation_config.json, then
    of config.json, in order, without repeats (Llama 3 instruct: <|end_of_text|>, <|eom_id|>,
    <|eot_id|>; Qwen instruct: <|im_end|>, <|endoftext|>). A checkpoint of this project declares its
    own in the generation_config.json that copy_tokenizer_files writes."""
    out = []
    for name in ("generation_config.json", "config.json"):
        f = os.path.join(path, name)
        e = read_json(f).get("eos_token_id") if os.path.exists(f) else None
        for x in e if isinstance(e, list) else [e]:
            if isinstance(x, int) and not isinstance(x, bool) and x not in out:
                out.append(x)
    return out


def has_tokenizer_files(path):
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in
                                       ("tokenizer.json", "vocab.json", "tokenizer.model",
                                        os.path.join("original", "tokenizer.model")))


def copy_tokenizer_files(src, dst, stop_ids=None):
    """Copy a Hugging Face folder's tokenizer files (TOKENIZER_FILES; Meta's original/tokenizer.model
    as tokenizer.model when it is the only one) into dst, so that dst's tokenizer reads the same.
    generation_config.json is copied with eos_token_id set to stop_ids (default: every end id src
    declares, declared_eos_ids), because dst's config.json may not be src's. Returns the names written."""
    os.makedirs(dst, exist_ok=True)
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return []
    names = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
    for f in names:
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    meta_model = os.path.join(src, "original", "tokenizer.model")
    if not any(f in names for f in ("tokenizer.json", "vocab.json", "tokenizer.model")) and os.path.isfile(meta_model):
        shutil.copyfile(meta_model, os.path.join(dst, "tokenizer.model"))
        names.append("tokenizer.model")
    gen_path = os.path.join(src, "generation_config.json")
    gen = read_json(gen_path) if os.path.exists(gen_path) else {}
    stops = list(stop_ids) if stop_ids is not None else declared_eos_ids(src)
    if stops or gen:
        gen["eos_token_id"] = stops if len(stops) != 1 else stops[0]
        with open(os.path.join(dst, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        names.append("generation_config.json")
    return names


def add_bk_token(path, bk_id):
    """Write <|BACKTRACK|> into the tokenizer files of folder `path` as a special added token with id
    bk_id, replacing whatever token held that id (Llama 3: a <|reserved_special_token_N|>), so that
    transformers' AutoTokenizer maps the text to bk_id and back."""
    entry = dict(content=BK_TEXT, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
    tj_path = os.path.join(path, "tokenizer.json")
    if os.path.exists(tj_path):
        with open(tj_path, encoding="utf-8") as f:
            tj = json.load(f)
        added = [a for a in tj.get("added_tokens") or [] if a["content"] != BK_TEXT or a["id"] == bk_id]
        for a in added:
            if a["id"] == bk_id:
                a.update(entry)
                break
        else:
            added.append(dict(id=bk_id, **entry))
        tj["added_tokens"] = sorted(added, key=lambda a: a["id"])
        vocab = (tj.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):   # a BPE vocabulary entry on that id gives way too
            for k in [k for k, v in vocab.items() if v == bk_id and k != BK_TEXT]:
                del vocab[k]
                vocab[BK_TEXT] = bk_id
        with open(tj_path, "w", encoding="utf-8") as f:
            json.dump(tj, f, ensure_ascii=False, indent=2)
    tc_path = os.path.join(path, "tokenizer_config.json")
    tc = read_json(tc_path) if os.path.exists(tc_path) else {}
    dec = {k: v for k, v in (tc.get("added_tokens_decoder") or {}).items()
           if not (isinstance(v, dict) and v.get("content") == BK_TEXT)}
    dec[str(bk_id)] = {k: v for k, v in entry.items()}
    tc["added_tokens_decoder"] = dict(sorted(dec.items(), key=lambda kv: int(kv[0])))
    with open(tc_path, "w", encoding="utf-8") as f:
        json.dump(tc, f, ensure_ascii=False, indent=2)


def write_byte_tokenizer(path, eot_id=256, bk_id=257, block_size=256):
    """The byte tokenizer (256 byte tokens, no merges; end-of-text and BK after them) as a
    tokenizer.json + tokenizer_config.json that transformers opens: a byte-level BPE without merges
    whose pre-tokenizer splits nothing, so every byte stays its own token."""
    b2u = bytes_to_unicode()
    added = [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
             for i, t in ((eot_id, EOT_TEXT), (bk_id, BK_TEXT))]
    tj = dict(version="1.0", truncation=None, padding=None, added_tokens=added, normalizer=None,
              pre_tokenizer=dict(type="ByteLevel", add_prefix_space=False, trim_offsets=False, use_regex=False),
              post_processor=None, decoder=dict(type="ByteLevel", add_prefix_space=False, trim_offsets=False,
                                                use_regex=False),
              model=dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix=None,
                         end_of_word_suffix=None, fuse_unk=False, byte_fallback=False, ignore_merges=False,
                         vocab={b2u[b]: b for b in range(256)}, merges=[]))
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False)
    tc = dict(tokenizer_class="PreTrainedTokenizerFast", eos_token=EOT_TEXT, model_max_length=block_size,
              added_tokens_decoder={str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added})
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, indent=2)
