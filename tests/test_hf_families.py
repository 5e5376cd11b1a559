"""Llama, Qwen2 and Qwen3 checkpoints: logit parity, cached and rewinding decode for every family,
sharded checkpoints, export round trips, bf16 and memory-aware loading, and tokenizers converted
from Hugging Face files (built here from the GPT-2 ranks, so no download is needed).

$ python -m pytest -q tests/test_hf_families.py
$ python tests/test_hf_families.py --load_bench        # peak memory and time loading a ~1.2B random
                                                       # Llama-3.2-1B-shaped checkpoint (/tmp, ~2.5 GB)
"""
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import time
import unicodedata

import numpy as np
import pytest
import regex
import tiktoken
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkpoint import load_model
from conftest import FIXTURES, ROOT
from data import Rule, Trace, collate, layout, resolve
from decode import generate, replay
from model import GPT, KVCache
from tokenizer import (BK_TEXT, GPT2_PAT, GPT2_RANKS, LLAMA3_PAT, LLAMA3_SPECIALS, QWEN2_PAT, bytes_to_unicode,
                       get_tokenizer, load_ranks)

FAMILIES = ["gpt2", "llama", "qwen2", "qwen3"]


def fixture(name):
    return os.path.join(FIXTURES, f"hf_{name}_tiny")


@functools.lru_cache(maxsize=None)
def load(name):
    return GPT.from_pretrained(fixture(name))


def reference(name):
    ids = torch.from_numpy(np.load(os.path.join(fixture(name), "ref_input_ids.npy")))
    return ids, torch.from_numpy(np.load(os.path.join(fixture(name), "ref_logits.npy")))

# -----------------------------------------------------------------------------
# the models


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_logits_match_reference(name):
    m = load(name)
    ids, ref = reference(name)
    V = ref.shape[-1]
    with torch.no_grad():
        out = m(ids)
    assert m.config.bk_id == V and out.shape[-1] > V   # the table is padded to hold BK
    assert (out[..., :V] - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_decoding_equals_full_forward(name):
    m = load(name)
    ids, _ = reference(name)
    B, T = ids.shape
    with torch.no_grad():
        full = m(ids)
        cache = KVCache(m.config, B, T)
        steps = []
        for t in range(T):
            steps.append(m(ids[:, t:t + 1], torch.full((B, 1), t), cache=cache))
            cache.lengths += 1
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5


def random_trace(rng, n_real, bk):
    P = [rng.randrange(n_real) for _ in range(rng.randint(1, 5))]
    R = [bk if rng.random() < 0.35 else rng.randrange(n_real) for _ in range(rng.randint(1, 16))]
    return Trace(P, R)


@pytest.mark.parametrize("name", FAMILIES)
def test_rewind_decoding_equals_training_forward(name):
    """Invariant 2 under `rewind` on each family: one batched forward of the error-hiding layout
    equals step-by-step decoding that frees the popped slot in place."""
    m = load(name)
    bk = m.config.bk_id
    rng = random.Random(0)
    traces = [random_trace(rng, bk, bk) for _ in range(4)]
    with torch.no_grad():
        train = m.action_logits(collate([layout(t, bk, Rule("rewind")) for t in traces]))
    out = replay(m, [t.prompt for t in traces], [t.response for t in traces], Rule("rewind"), return_logits=True)
    dec = torch.cat([torch.stack(o["logits"]) for o in out])
    assert train.shape == dec.shape
    assert (train - dec).abs().max().item() < 1e-5
    assert [o["resolved"] for o in out] == [resolve(t.response, bk) for t in traces]


def test_sharded_checkpoint_loads_identically(tmp_path):
    src = fixture("llama")
    with safe_open(os.path.join(src, "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    # k and v go to the second file, q stays in the first: the loader must hold q until its siblings come
    second = lambda k: "k_proj" in k or "v_proj" in k or k.startswith("lm_head")
    files = {"model-00001-of-00002.safetensors": {k: t for k, t in tensors.items() if not second(k)},
             "model-00002-of-00002.safetensors": {k: t for k, t in tensors.items() if second(k)}}
    weight_map = {}
    for fname, part in files.items():
        save_file(part, str(tmp_path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    shutil.copy(os.path.join(src, "config.json"), tmp_path)
    m = GPT.from_pretrained(str(tmp_path))
    ids, _ = reference("llama")
    with torch.no_grad():
        assert torch.equal(m(ids), load("llama")(ids))


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_export_hf_round_trip(name, tmp_path):
    m = load(name)
    m.export_hf(str(tmp_path))
    m2 = GPT.from_pretrained(str(tmp_path))
    c, c2 = m.config, m2.config
    assert (c2.bk_id, c2.vocab_size, c2.qkv_bias, c2.qk_norm, c2.tie_embeddings, c2.n_kv_head, c2.head_dim) == \
        (c.bk_id, c.vocab_size, c.qkv_bias, c.qk_norm, c.tie_embeddings, c.n_kv_head, c.head_dim)
    ids, _ = reference(name)
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))


def test_bf16_load():
    """bf16 weights, fp32 rotary frequencies (rounding them to bf16 would shift every angle)."""
    m = GPT.from_pretrained(fixture("llama"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.inv_freq.dtype == torch.float32
    ids, ref = reference("llama")
    with torch.no_grad():
        out = m(ids)[..., :ref.shape[-1]].float()
    assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item()

# -----------------------------------------------------------------------------
# memory-aware loading: peak memory stays near one copy of the weights in the target dtype

def llama_shapes(hidden, layers, heads, kv_heads, inter, vocab, tie=True):
    """(Hugging Face name, shape) of every tensor of a Llama checkpoint."""
    D = hidden // heads
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
                (p + "self_attn.q_proj.weight", (heads * D, hidden)), (p + "self_attn.k_proj.weight", (kv_heads * D, hidden)),
                (p + "self_attn.v_proj.weight", (kv_heads * D, hidden)), (p + "self_attn.o_proj.weight", (hidden, heads * D)),
                (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                (p + "mlp.down_proj.weight", (hidden, inter))]
    out.append(("model.norm.weight", (hidden,)))
    if not tie:
        out.append(("lm_head.weight", (vocab, hidden)))
    return out


def write_random_llama(path, n_shards=2, dtype=torch.bfloat16, seed=0, hidden=256, layers=4, heads=8, kv_heads=2,
                       inter=1024, vocab=8192, tie=True):
    """A random Llama-layout Hugging Face checkpoint in n_shards files with an index, written one
    shard at a time (memory: about one shard). Returns the number of parameters."""
    os.makedirs(path, exist_ok=True)
    shapes = llama_shapes(hidden, layers, heads, kv_heads, inter, vocab, tie)
    total = sum(int(np.prod(s)) for _, s in shapes)
    g = torch.Generator().manual_seed(seed)
    weight_map, i = {}, 0
    for s in range(n_shards):
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part, size = {}, 0
        while i < len(shapes) and (size < total / n_shards or s == n_shards - 1):
            k, shape = shapes[i]
            t = torch.ones(shape) if k.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
            part[k] = t.to(dtype)
            size += t.numel()
            weight_map[k] = fname
            i += 1
        save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
        del part
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total * torch.finfo(dtype).bits // 8}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=tie, rms_norm_eps=1e-5,
                       max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=vocab - 2,
                       eos_token_id=vocab - 1, torch_dtype=str(dtype).split(".")[-1]), f)
    return total


# Runs in a fresh interpreter: VmHWM is the process's peak resident memory, and it includes
# everything imported, so the load's own peak is VmHWM after the load minus VmRSS before it.
MEASURE = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[1])
from model import GPT
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
GPT.from_pretrained(sys.argv[4], dtype=getattr(torch, sys.argv[3]))  # warm-up: torch pages in its code once
before = status("VmRSS")
t0 = time.time()
m = GPT.from_pretrained(sys.argv[2], dtype=getattr(torch, sys.argv[3]))
dt = time.time() - t0
weights = sum(p.numel() * p.element_size() for p in m.parameters())
print(status("VmHWM") - before, weights, dt)
"""


def measure_load(path, dtype):
    """(peak extra resident bytes, bytes of the loaded weights, seconds) of from_pretrained in a subprocess."""
    out = subprocess.run([sys.executable, "-c", MEASURE, ROOT, path, dtype, fixture("llama")], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[0]), int(out[1]), float(out[2])


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("random_llama"))
    write_random_llama(path, n_shards=3, hidden=512, layers=6, heads=8, kv_heads=2, inter=2048,
                       vocab=16384)  # ~31M parameters, bf16 on disk, 62 MB
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_peaks_near_one_copy(random_llama, dtype):
    """Before loading allocated the model in its target dtype, a bf16 load peaked at 3x the weights
    (an fp32 model, then its bf16 cast); now about 1.2x (fp32) and 1.35x (bf16): one copy plus the
    largest tensor as read from disk."""
    peak, weights, _ = measure_load(random_llama, dtype)
    assert peak < 1.35 * weights + 40e6, (peak, weights)

# -----------------------------------------------------------------------------
# tokenizers converted from Hugging Face files


@functools.lru_cache(maxsize=None)
def gpt2_ranks():
    return load_ranks(GPT2_RANKS)


@functools.lru_cache(maxsize=None)
def gpt2_merges():
    """Merges that make Hugging Face's BPE equal tiktoken's: every split of every multi-byte token into
    two tokens, ordered by the token's rank (then by the halves' ranks). Taking one split per token
    (say the one whose larger half has the lowest rank) is not enough: some tokens are then never
    reached, because an earlier merge takes a byte their split needed."""
    ranks = gpt2_ranks()
    merges = []
    for tok, r in ranks.items():
        merges += [(r, ranks[tok[:i]], ranks[tok[i:]], tok[:i], tok[i:]) for i in range(1, len(tok))
                   if tok[:i] in ranks and tok[i:] in ranks]
    return [(a, b) for *_, a, b in sorted(merges)]


def hf_bpe(piece, merge_rank):
    """Hugging Face's BPE on one piece: repeatedly merge the adjacent pair listed first in merges."""
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        r, i = min((merge_rank.get((parts[i], parts[i + 1]), float("inf")), i) for i in range(len(parts) - 1))
        if r == float("inf"):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


TEXTS = [
    "Hello world! It's 2024; we'll re-check the 12345 apples... OK?",
    "  leading spaces,\ttabs\nnew lines\r\n\n\nand trailing   ",
    "Unicode: héllo wörld, naïve café, 日本語のテキスト, Ελληνικά, emoji 🤖🚀, ℕ ∑ ∞, e\u0301",
    "The literal " + BK_TEXT + " and <|endoftext|> and <|im_end|> are text when a user types them.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.\n#### 72",
    "x1 x2 x3 BK BK $1,000,000.50 - 3.14159e-10 = ??? {'a': [1, 2]} https://example.com/a_b?c=d",
]


def test_reconstructed_merges_encode_like_the_ranks():
    """The merges written below are a faithful Hugging Face view of the GPT-2 ranks: Hugging Face's
    pair-order BPE over them gives tiktoken's encoding, on the texts and on 3000 token pairs."""
    ranks = gpt2_ranks()
    merge_rank = {m: i for i, m in enumerate(gpt2_merges())}
    enc = tiktoken.Encoding("gpt2_ref", pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens={})
    rng = random.Random(0)
    toks = list(ranks)
    pieces = [p.encode() for t in TEXTS for p in regex.findall(GPT2_PAT, t)]
    pieces += [rng.choice(toks) + rng.choice(toks) for _ in range(3000)]
    for p in pieces:  # tiktoken's BPE on one piece, no regex split: the merge step alone is compared
        assert [ranks[x] for x in hf_bpe(p, merge_rank)] == enc._encode_single_piece(p)


def write_hf_bpe(path, kind="json", n=None, pre_tokenizer=None, added=None, normalizer=None, tokenizer_config=None):
    """A byte-level BPE folder in Hugging Face's format from the GPT-2 ranks (the first n of them).
    kind 'json': tokenizer.json; 'slow': vocab.json + merges.txt (vocab.json then holds the added tokens
    too, as GPT-2's does). added: {text: id}; default GPT-2's <|endoftext|> right after the ranks."""
    os.makedirs(path, exist_ok=True)
    b2u = bytes_to_unicode()
    text = lambda b: "".join(b2u[x] for x in b)
    ranks = {t: r for t, r in gpt2_ranks().items() if n is None or r < n}
    n = len(ranks)
    vocab = {text(t): r for t, r in ranks.items()}
    merges = [(text(a), text(b)) for a, b in gpt2_merges() if ranks.get(a + b, n) < n]
    added = {"<|endoftext|>": n} if added is None else added
    if kind == "slow":
        with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({**vocab, **added}, f, ensure_ascii=False)
        with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    else:
        tj = dict(version="1.0", truncation=None, padding=None,
                  added_tokens=[dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False,
                                     normalized=False, special=True) for t, i in added.items()],
                  normalizer=normalizer,
                  pre_tokenizer=pre_tokenizer or dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True,
                                                      use_regex=True),
                  post_processor=None, decoder=dict(type="ByteLevel"),
                  model=dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix="",
                             end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=False,
                             vocab=vocab, merges=[[a, b] for a, b in merges]))
        with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(tj, f, ensure_ascii=False)
    if tokenizer_config is not None:
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(tokenizer_config, f)


def split_then_bytes(regex_pat):
    """The pre_tokenizer Llama 3 and Qwen write: their regex, then a ByteLevel that splits no more."""
    return dict(type="Sequence", pretokenizers=[
        dict(type="Split", pattern=dict(Regex=regex_pat), behavior="Isolated", invert=False),
        dict(type="ByteLevel", add_prefix_space=False, trim_offsets=False, use_regex=False)])


@pytest.mark.parametrize("kind", ["json", "slow"])
def test_gpt2_tokenizer_from_hf_files(tmp_path, kind):
    write_hf_bpe(str(tmp_path), kind)
    tok, ref = get_tokenizer(str(tmp_path)), get_tokenizer("gpt2")
    assert (tok.name, tok.eot_id, tok.bk_id, tok.n_vocab) == ("gpt2", 50256, 50257, 50258)
    for t in TEXTS:
        ids = tok.encode(t)
        assert ids == ref.encode(t) and tok.decode(ids) == t
        assert tok.bk_id not in ids and tok.eot_id not in ids
    assert tok.decode([tok.bk_id, tok.eot_id]) == BK_TEXT + "<|endoftext|>"


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_qwen_tokenizer_from_hf_files(tmp_path):
    """Qwen layout: its own regex (one digit per piece) in tokenizer.json, NFC, ChatML markers added
    after the ranks, eos <|im_end|>; BK takes the first id past the tokenizer's tokens. The chat
    template renders a turn; a marker typed in it stays text (tests/test_instruct.py compares real
    templates with transformers)."""
    added = {"<|endoftext|>": 50256, "<|im_start|>": 50257, "<|im_end|>": 50258}
    write_hf_bpe(str(tmp_path), n=50256, added=added, pre_tokenizer=split_then_bytes(QWEN2_PAT),
                 normalizer=dict(type="NFC"), tokenizer_config=dict(eos_token="<|im_end|>", tokenizer_class="Qwen2Tokenizer",
                                                                    chat_template=CHATML))
    tok = get_tokenizer(str(tmp_path))
    assert (tok.name, tok.eot_id, tok.bk_id, tok.n_vocab) == ("qwen2", 50258, 50259, 50260)
    ref = tiktoken.Encoding("qwen_ref", pat_str=QWEN2_PAT, mergeable_ranks=gpt2_ranks(), special_tokens={})
    for t in TEXTS:
        assert tok.encode(t) == ref.encode_ordinary(unicodedata.normalize("NFC", t))
    assert tok.decode(tok.encode("12345")) == "12345" and len(tok.encode("12345")) == 5
    assert tok.encode("e\u0301") == tok.encode("\u00e9")
    q = "What is 2+2? <|im_end|>"
    assert tok.chat and tok.decode(tok.chat_ids(q)) == f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.chat_ids(q, system="Be brief.")
    assert tok.decode(ids) == f"<|im_start|>system\nBe brief.<|im_end|>\n" + tok.decode(tok.chat_ids(q))
    assert ids.count(50258) == 2 and ids.count(50257) == 3   # the typed <|im_end|> stays text


def test_llama3_tokenizer_model(tmp_path):
    """Meta's format: tokenizer.model is a tiktoken ranks file; the 256 special tokens follow the ranks
    and BK takes the last reserved one, so the table keeps its shape."""
    os.makedirs(tmp_path / "original")
    shutil.copy(GPT2_RANKS, tmp_path / "original" / "tokenizer.model")
    tok = get_tokenizer(str(tmp_path))
    n = 50256   # gpt2.tiktoken holds the BPE ranks only, like Meta's file
    assert (tok.name, tok.bos_id, tok.eot_id, tok.bk_id, tok.n_vocab) == ("llama3", n, n + 1, n + 255, n + 256)
    ref = tiktoken.Encoding("llama_ref", pat_str=LLAMA3_PAT, mergeable_ranks=gpt2_ranks(), special_tokens={})
    for t in TEXTS:
        assert tok.encode(t) == ref.encode_ordinary(t) and tok.decode(tok.encode(t)) == t
    assert [tok.decode([i]) for i in tok.encode("12345")] == ["123", "45"]
    assert tok.chat_template is None and not tok.chat   # Meta's files carry no chat template: prompts stay plain
    with pytest.raises(ValueError, match="no chat template"):
        tok.chat_ids("Q?")
    # the same tokenizer written as tokenizer.json (Split regex + ByteLevel), with Llama's added tokens
    write_hf_bpe(str(tmp_path / "json"), n=n, added={t: n + i for i, t in enumerate(LLAMA3_SPECIALS)},
                 pre_tokenizer=split_then_bytes(LLAMA3_PAT), tokenizer_config=dict(eos_token="<|eot_id|>"))
    tj = get_tokenizer(str(tmp_path / "json"))
    assert (tj.name, tj.eot_id, tj.bk_id) == ("llama3", n + 9, n + 255)
    assert all(tj.encode(t) == tok.encode(t) for t in TEXTS)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_model_and_tokenizer_agree(tmp_path, name):
    """A Hugging Face folder with a tokenizer: the loader takes eot and BK from it. The fixtures' table
    has 1000 rows; the tokenizers written here fill it (Llama: 744 ranks + 256 specials, BK on the last
    reserved row) or leave room (Qwen: 990 ranks + 3 markers, BK on the first unused row)."""
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(fixture(name), f), tmp_path)
    if name == "llama":
        write_hf_bpe(str(tmp_path), n=744, added={t: 744 + i for i, t in enumerate(LLAMA3_SPECIALS)},
                     pre_tokenizer=split_then_bytes(LLAMA3_PAT), tokenizer_config=dict(eos_token="<|eot_id|>"))
        want = dict(eot_id=753, bk_id=999, n_vocab=1000)
    else:
        write_hf_bpe(str(tmp_path), n=990, added={"<|endoftext|>": 990, "<|im_start|>": 991, "<|im_end|>": 992},
                     pre_tokenizer=split_then_bytes(QWEN2_PAT), tokenizer_config=dict(eos_token="<|im_end|>"))
        want = dict(eot_id=992, bk_id=993, n_vocab=994)
    m, tok = load_model(str(tmp_path))   # the folder's tokenizer decides eot and BK
    assert get_tokenizer(m.config.tokenizer).bk_id == tok.bk_id   # the config names the folder, so generate.py finds it
    assert dict(eot_id=m.config.eot_id, bk_id=m.config.bk_id, n_vocab=m.config.n_vocab) == want
    assert (tok.eot_id, tok.bk_id, tok.n_vocab) == (m.config.eot_id, m.config.bk_id, m.config.n_vocab)
    assert m.config.vocab_size == 1000   # the checkpoint's own table, not grown
    ids, ref = reference(name)
    with torch.no_grad():
        assert (m(ids) - ref).abs().max().item() < 1e-5
    out = generate(m, [tok.encode("2+2?")], max_new_tokens=8, temperature=0)
    assert all(t < m.config.n_vocab for t in out[0]["response"])


if __name__ == "__main__":
    # Load bench: a random checkpoint with Llama-3.2-1B's shapes, bf16 in 3 shards under /tmp.
    if "--load_bench" not in sys.argv:
        sys.exit(__doc__)
    path = "/tmp/llama_1b_random"
    shape = dict(hidden=2048, layers=16, heads=32, kv_heads=8, inter=8192, vocab=128256, tie=True)
    if not os.path.exists(os.path.join(path, "config.json")):
        t0 = time.time()
        n = write_random_llama(path, n_shards=3, **shape)
        print(f"wrote {n / 1e9:.2f}B parameters to {path} in {time.time() - t0:.0f}s")
    for dtype in ["float32", "bfloat16"]:
        peak, weights, dt = measure_load(path, dtype)
        print(f"{dtype:9s} load {dt:5.1f}s  peak extra RSS {peak / 2**30:5.2f} GiB  "
              f"weights {weights / 2**30:5.2f} GiB  ratio {peak / weights:.2f}")
