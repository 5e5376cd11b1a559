"""
The transformer, its KV cache and the sampler.

One model class. GPT-2 (learned positions, LayerNorm, GELU-tanh, biases, tied head) is the default;
the Llama family (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head, optional qkv bias
as in Qwen2, per-head q/k RMSNorm as in Qwen3) are config switches on the same code.

Backtracking is native in two places:
- training: forward() takes explicit position ids and a boolean (B, T, T) attention mask, so the
  error-hiding `rewind` layout of data.py runs in one forward;
- inference: KVCache keeps a length per row. A token is written at the slot equal to its position
  id, a query attends to slots <= its own, so rewinding a row is `length -= 1`: nothing is copied.
"""
import json
import math
import os
import shutil
from dataclasses import dataclass, asdict, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import hf


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 320          # padded table size; tokens beyond the tokenizer's n_vocab are never produced
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0             # 0 = n_head (no grouped-query attention)
    n_embd: int = 256
    head_dim: int = 0              # 0 = n_embd // n_head
    n_inner: int = 0               # MLP width; 0 = 4 * n_embd
    dropout: float = 0.0
    bias: bool = True              # biases in linears and norms (GPT-2)
    qkv_bias: bool = False         # bias on q/k/v only (Qwen2), when bias=False
    norm: str = "layernorm"        # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "gelu"              # gelu (tanh approximation) | swiglu
    pos: str = "learned"           # learned | rope
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # Llama-3 style: factor, low/high_freq_factor, original_max_position_embeddings
    qk_norm: bool = False          # RMSNorm on each head's q and k (Qwen3)
    tie_embeddings: bool = True
    # tokenizer facts, recorded so a checkpoint is self-describing
    tokenizer: str = "byte"
    n_vocab: int = 258             # real tokens (ids < n_vocab); the rest of the table is padding
    eot_id: int = 256
    bk_id: int = 257

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.n_inner = self.n_inner or 4 * self.n_embd


# -----------------------------------------------------------------------------
# layers


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


def make_norm(cfg, n):
    if cfg.norm == "rmsnorm":
        return RMSNorm(n, cfg.norm_eps)
    return nn.LayerNorm(n, eps=cfg.norm_eps, bias=cfg.bias)


def rope_inv_freq(cfg):
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = cfg.rope_scaling or {}
    if s.get("rope_type", s.get("type")) == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short kept, smooth in between
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.float()


def apply_rope(x, cos, sin):
    # x (B, H, T, D); the Hugging Face layout rotates the two halves of each head
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, K, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, (H + 2 * K) * D, bias=cfg.bias or cfg.qkv_bias)
        self.c_proj = nn.Linear(H * D, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.norm_eps)
            self.k_norm = RMSNorm(D, cfg.norm_eps)
        self.dropout = cfg.dropout

    def forward(self, x, rope, mask, cache, layer):
        cfg = self.cfg
        B, T, _ = x.shape
        H, K, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        q, k, v = self.c_attn(x).split([H * D, K * D, K * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, K, D).transpose(1, 2)
        v = v.view(B, T, K, D).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.write(layer, k, v)
        if K != H:
            k = k.repeat_interleave(H // K, dim=1)
            v = v.repeat_interleave(H // K, dim=1)
        drop = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), dropout_p=drop)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return F.dropout(self.c_proj(y), drop, self.training)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            self.gate_proj = nn.Linear(cfg.n_embd, cfg.n_inner, bias=cfg.bias)
        self.c_fc = nn.Linear(cfg.n_embd, cfg.n_inner, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_inner, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x):
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.c_fc(x)
        else:
            h = F.gelu(self.c_fc(x), approximate="tanh")
        return F.dropout(self.c_proj(h), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = make_norm(cfg, cfg.n_embd)
        self.attn = Attention(cfg)
        self.ln_2 = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, cache, layer):
        x = x + self.attn(self.ln_1(x), rope, mask, cache, layer)
        return x + self.mlp(self.ln_2(x))

# -----------------------------------------------------------------------------
# the KV cache


class KVCache:
    """Preallocated keys/values for every layer, a length per row, and each slot's final hidden
    state (so the logits of the top slot can be read again after a rewind without recomputing).

    Slots are position ids: a token at position p lives in slot p, and a query at position p
    attends to slots 0..p. Under `rewind` the surviving tokens are exactly slots 0..length-1,
    so deleting a token is `lengths[row] -= 1` (pop) (in place, O(1), rows independent). A later write
    simply overwrites the freed slot.
    """

    def __init__(self, cfg, batch_size, max_len, device="cpu", dtype=torch.float32):
        # (layer, row, head, slot, dim): a layer's span of slots reads out already in the
        # (B, K, S, D) layout attention wants, with no transpose copy (faster at long lengths)
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.h = torch.zeros(batch_size, max_len, cfg.n_embd, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self.pos = None  # positions of the tokens being written by the forward in flight
        self.span = 0    # slots the current forward attends over

    def begin(self, pos):
        """Set up a write of tokens at positions pos (B, T); returns the attention mask."""
        if int(pos.max()) >= self.max_len:
            raise ValueError(f"KV cache is full: position {int(pos.max())} >= max_len {self.max_len}")
        self.pos = pos
        self.span = int(pos.max()) + 1
        slots = torch.arange(self.span, device=pos.device)
        return slots.view(1, 1, -1) <= pos.unsqueeze(-1)   # (B, T, span)

    def write(self, layer, k, v):
        # k, v: (B, K, T, D) -> slots pos; return the whole span (B, K, span, D)
        B = k.shape[0]
        rows = torch.arange(B, device=k.device).unsqueeze(1)
        # advanced indices on dims 0 and 2 around a slice: the indexed view is (B, T, K, D)
        self.k[layer][rows, :, self.pos] = k.transpose(1, 2).to(self.k.dtype)
        self.v[layer][rows, :, self.pos] = v.transpose(1, 2).to(self.v.dtype)
        return (self.k[layer, :, :, :self.span].to(k.dtype),
                self.v[layer, :, :, :self.span].to(v.dtype))

    def pop(self, rows, n=1):
        """Free the top n slots of the given rows (bool mask or index tensor): the `rewind` policy's
        deletion (docs/backtrack-semantics.md §3). In place, O(1), rows independent."""
        self.lengths[rows] -= n

# -----------------------------------------------------------------------------
# the model


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=make_norm(cfg, cfg.n_embd),
        ))
        if cfg.pos == "learned":
            self.transformer["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        else:
            self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for n, p in self.named_parameters():  # GPT-2: scaled init of the residual projections
            if n.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .bfloat16() and to_empty() all come through here. The rotary frequencies stay
        # fp32 whatever the weights' dtype (in bf16 every angle pos * freq would drift), and are
        # recomputed rather than moved, since to_empty() leaves them uninitialised.
        super()._apply(fn, *args, **kwargs)
        if self.config.pos == "rope":
            self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    def num_params(self):
        n = sum(p.numel() for p in self.parameters())
        if self.config.pos == "learned":
            n -= self.transformer.wpe.weight.numel()
        return n

    def hidden(self, idx, pos=None, mask=None, cache=None):
        """Final hidden states (after the last norm), (B, T, C).

        pos: (B, T) position ids (default 0..T-1). mask: (B, T, T) bool, True = may attend
        (default causal). With a cache, tokens are written at slots pos and attend to slots
        <= their position; the cache's lengths are left for the caller to move.
        """
        B, T = idx.shape
        if pos is None:
            pos = torch.arange(T, device=idx.device).expand(B, T)
        if int(pos.max()) >= self.config.block_size and self.config.pos == "learned":
            raise ValueError(f"position {int(pos.max())} exceeds block_size {self.config.block_size}")
        if cache is not None:
            mask = cache.begin(pos)
        x = self.transformer.wte(idx)
        rope = None
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(pos)
        else:
            f = pos.unsqueeze(-1).float() * self.inv_freq          # (B, T, D/2)
            f = torch.cat((f, f), dim=-1).unsqueeze(1)              # (B, 1, T, D)
            rope = (f.cos().to(x.dtype), f.sin().to(x.dtype))
        x = F.dropout(x, self.config.dropout, self.training)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, mask, cache, i)
        x = self.transformer.ln_f(x)
        if cache is not None:
            rows = torch.arange(B, device=idx.device).unsqueeze(1)
            cache.h[rows, pos] = x.to(cache.h.dtype)
        return x

    def forward(self, idx, pos=None, mask=None, cache=None, act=None):
        """Logits (B, T, vocab_size); with act=(rows, cols), only those nodes' logits (A, vocab_size):
        in training only the nodes that act go through lm_head, most of the cost at large vocab."""
        h = self.hidden(idx, pos, mask, cache)
        if act is not None:
            h = h[act[0], act[1]]
        return self.lm_head(h)

    def action_logits(self, batch):
        return action_logits(self, batch)

    # -- checkpoints -----------------------------------------------------------

    def save(self, path, meta=None, files=None):
        """Write the project's checkpoint folder atomically: model.safetensors + config.json
        (the model config, tokenizer and backtrack id, plus `meta`), and `files` (name -> object,
        e.g. optimizer state) through torch.save. Everything is written to a temporary folder,
        then renamed over the old one, so a crash never leaves a half-written checkpoint. Other
        files in the folder (a run's metrics.jsonl) move into the new folder first."""
        from safetensors.torch import save_file
        path = path.rstrip("/")
        tmp, old = path + ".tmp", path + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()
              if not (self.config.tie_embeddings and k == "lm_head.weight")}
        save_file(sd, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(dict(format="backtrack-gpt", config=asdict(self.config), **(meta or {})), f, indent=2)
        for name, obj in (files or {}).items():
            torch.save(obj, os.path.join(tmp, name))
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            for name in os.listdir(path):   # carry over what this save does not write (logs, eval results)
                if not os.path.exists(os.path.join(tmp, name)):
                    os.replace(os.path.join(path, name), os.path.join(tmp, name))
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, tok_ids=None):
        """Load the project's checkpoint folder, or a Hugging Face folder (GPT-2, Llama, Qwen2,
        Qwen3; one safetensors file or shards with an index). Returns the model in eval mode.
        tok_ids: the folder's tokenizer facts (tokenizer.hf_tokenizer_ids), so that a Hugging Face
        model takes its end-of-text and BK ids from its own tokenizer; common.load_model passes them."""
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"no config.json in checkpoint folder {path!r}")
        meta = hf.read_json(cfg_path)
        if meta.get("format") == "backtrack-gpt":
            cfg = GPTConfig(**meta["config"])
            names = {"model.safetensors": None}
        else:
            cfg = GPTConfig(**hf.config_from_hf(meta, cfg_path, tok_ids))
            names = hf.safetensors_files(path)
        # Allocate the model once, already in the target dtype and on the target device, and copy each
        # tensor into it as it is read (cast on the fly): peak memory stays near one copy of the weights
        # plus the largest tensor, not an fp32 model plus its cast.
        with torch.device("meta"):
            model = cls(cfg).to(dtype)
        model.to_empty(device=device)
        sd = model.state_dict()
        loaded = set()
        from safetensors import safe_open
        for name in names:  # one shard at a time, each tensor cast as it is read
            with safe_open(os.path.join(path, name), framework="pt") as f:
                for k in f.keys():
                    for ok, t in (hf.convert_hf_tensor(k, f.get_tensor(k), cfg) if meta.get("format") != "backtrack-gpt"
                                  else [(k, f.get_tensor(k))]):
                        if ok not in sd:
                            continue
                        if ok == "transformer.wte.weight" or ok == "lm_head.weight":
                            sd[ok].zero_()
                            sd[ok][:t.shape[0]].copy_(t)   # HF table rows; BK and padding rows start at zero
                        else:
                            if sd[ok].shape != t.shape:
                                raise ValueError(f"{path}: tensor {k} has shape {tuple(t.shape)}, expected {tuple(sd[ok].shape)}")
                            sd[ok].copy_(t)
                        loaded.add(ok)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.transformer.wte.weight
            loaded.add("lm_head.weight")
        missing = [k for k in sd if k not in loaded]
        if missing:
            raise ValueError(f"{path}: checkpoint lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
        model.meta = meta
        return model.eval()

    def export_hf(self, path):
        """Write a Hugging Face folder (config.json + model.safetensors) that other tools open:
        GPT-2 layout or Llama layout, by the config (hf.write_folder)."""
        hf.write_folder(self.config, self.state_dict(), path)

# -----------------------------------------------------------------------------
# the backtrack token's embedding (research notes, section 3)

SEMANTIC_WORDS = ["delete", "remove", "undo", "erase", "back", "cancel"]
DESCRIPTION = "This token is used to delete the previous token in the response."


@torch.no_grad()
def init_bk_embedding(model, tok, method="description", noise=True, seed=0):
    """Initialise the backtrack token's input row (and output row when untied).

    mean: mean of the real vocabulary's rows. semantic: mean over SEMANTIC_WORDS (each word's
    tokens averaged first, with and without a leading space). description: mean of DESCRIPTION's
    token rows. Gaussian noise at the table's own std keeps the row distinct from its sources.
    """
    g = torch.Generator().manual_seed(seed)
    tables = [model.transformer.wte.weight]
    if not model.config.tie_embeddings:
        tables.append(model.lm_head.weight)
    bk, n = tok.bk_id, tok.eot_id  # ids below eot_id are the ordinary vocabulary
    for W in tables:
        if method == "mean":
            v = W[:n].mean(0)
        elif method == "semantic":
            words = [w for s in SEMANTIC_WORDS for w in (s, " " + s)]
            v = torch.stack([W[tok.encode(w)].mean(0) for w in words]).mean(0)
        elif method == "description":
            v = W[tok.encode(DESCRIPTION)].mean(0)
        else:
            raise ValueError(f"unknown bk init {method!r}: expected mean|semantic|description")
        if noise:
            v = v + torch.randn(v.shape, generator=g).to(W) * W[:n].std()
        W[bk] = v

# -----------------------------------------------------------------------------
# sampling: one function shapes the distribution for generation and for training log-probs


def shape_logits(logits, temperature=1.0, top_k=0, top_p=1.0, ban=None):
    """Return log-probs of the distribution actually sampled from.

    ban: (A, V) bool, True = this token may not be sampled (backtrack bans and caps).
    Order: bans, temperature, top-k, top-p. Greedy (temperature 0) uses the banned logits' argmax
    and is scored at temperature 1. Log-probs of filtered tokens are -inf.
    """
    logits = logits.float()
    if ban is not None:
        logits = logits.masked_fill(ban, float("-inf"))
    if temperature and temperature > 0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        srt, order = torch.sort(logits, dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) > top_p   # keep the smallest prefix whose mass reaches top_p
        drop = torch.zeros_like(drop).scatter(-1, order, drop)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def ban_matrix(batch, n_actions, vocab_size, n_vocab):
    """(A, V) bool from a collated batch's ban lists; ids >= n_vocab (table padding) are always banned."""
    ban = torch.zeros(n_actions, vocab_size, dtype=torch.bool, device=batch["tgt"].device)
    ban[:, n_vocab:] = True
    if batch["ban_act"].numel():
        ban[batch["ban_act"], batch["ban_tok"]] = True
    return ban


def action_logits(model, batch):
    """Logits for the actions of a collated batch (data.collate): (A, vocab_size). `model` may be
    wrapped (DDP, torch.compile): the call goes through its forward so gradient sync works."""
    return model(batch["ids"], batch["pos"], batch["mask"], act=(batch["act_row"], batch["act_src"]))


def unwrap(model):
    """The GPT inside a DDP and/or torch.compile wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def action_logprobs(model, batch, temperature=1.0, top_k=0, top_p=1.0):
    """Log-prob of every action of a collated batch under the sampled distribution: (A,)."""
    logits = action_logits(model, batch)
    ban = ban_matrix(batch, logits.shape[0], logits.shape[1], unwrap(model).config.n_vocab)
    lp = shape_logits(logits, temperature, top_k, top_p, ban)
    return lp.gather(1, batch["tgt"].unsqueeze(1)).squeeze(1)


def sft_loss(model, batch, normalizer=None):
    """Weighted cross-entropy over actions (masked errors have weight 0), divided by the total
    weight, or by `normalizer` (the whole global batch's weight, so that gradient accumulation
    and DDP give the same loss as one big batch)."""
    lp = action_logprobs(model, batch)
    w = batch["weight"]
    nll = torch.where(w > 0, -lp * w, torch.zeros_like(lp))  # a weight-0 action never adds 0 * inf
    return nll.sum() / (w.sum().clamp(min=1.0) if normalizer is None else normalizer)


def completion_logprobs(model, batch):
    """Sum of log-probs over each row's completion actions (weight 1): (B,). The shared prefix
    contributes exactly nothing, even where its log-prob is -inf (a banned token)."""
    lp = action_logprobs(model, batch)
    w = batch["weight"] > 0
    lp = torch.where(w, lp, torch.zeros_like(lp))
    B = batch["ids"].shape[0]
    return torch.zeros(B, device=lp.device, dtype=lp.dtype).index_add(0, batch["act_row"], lp)


def sample(logprobs, gen):
    """One draw per row by inverting the CDF with u in (0, 1]: a token of zero probability is
    never picked (the first index whose CDF reaches u has mass), and it is much cheaper than
    torch.multinomial at a large vocabulary on CPU."""
    cdf = logprobs.exp().cumsum(-1)
    u = (1.0 - torch.rand(cdf.shape[0], 1, generator=gen, device=cdf.device)) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp(max=cdf.shape[1] - 1)

# -----------------------------------------------------------------------------
# generation with in-place rewinds


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
    if policy == "rewind" and not slot_bans and max_retries is None and not (temperature and temperature > 0) \
            and force is None:
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
    plen = torch.tensor([len(p) for p in prompts], device=device)
    Tp = int(plen.max())
    max_len = Tp + max_new_tokens + 1
    if cfg.pos == "learned" and max_len > cfg.block_size:
        max_len = cfg.block_size
    dtype = next(model.parameters()).dtype
    cache = KVCache(cfg, B, max_len, device=device, dtype=dtype)
    idx = torch.zeros(B, Tp, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = torch.tensor(p, device=device)
    model.hidden(idx, torch.arange(Tp, device=device).expand(B, Tp), cache=cache)
    cache.lengths.copy_(plen)

    D = max_new_tokens + 2                  # stack depths 0..max_new_tokens (+1 spare for the clear below)
    K = max(1, min(x for x in (max_retries, max_backtracks, max_new_tokens) if x is not None))
    rows = torch.arange(B, device=device)
    stack = torch.zeros(B, D, dtype=torch.long, device=device)       # surviving response tokens, by depth
    depth = torch.zeros(B, dtype=torch.long, device=device)          # how many survive
    n_bk = torch.zeros(B, dtype=torch.long, device=device)
    retries = torch.zeros(B, D, dtype=torch.long, device=device)     # depth -> deletions there (§4)
    ban_tok = torch.zeros(B, D, K, dtype=torch.long, device=device)  # rewind: tokens deleted at each depth
    ban_n = torch.zeros(B, D, dtype=torch.long, device=device)
    done = force_len == 0 if force is not None else torch.zeros(B, dtype=torch.bool, device=device)
    actions, logprobs, alive, kept_logits = [], [], [], []
    V = cfg.vocab_size
    for step in range(max_new_tokens):
        logits = model.lm_head(cache.h[rows, cache.lengths - 1])       # (B, V)
        ban = torch.zeros(B, V + 1, dtype=torch.bool, device=device)  # column V: where unused entries go
        ban[:, cfg.n_vocab:] = True
        if policy == "rewind" and slot_bans:
            cur = ban_tok[rows, depth]                                  # (B, K)
            used = torch.arange(K, device=device) < ban_n[rows, depth].unsqueeze(1)
            ban.scatter_(1, torch.where(used, cur, V), True)
        no_bk = depth == 0
        if max_backtracks is not None:
            no_bk |= n_bk >= max_backtracks
        if max_retries is not None:
            no_bk |= (depth > 0) & (retries[rows, (depth - 1).clamp(min=0)] >= max_retries)
        ban[:, bk] |= no_bk
        ban = ban[:, :V]
        # a row whose every token is banned has tried and deleted everything at this slot: it ends
        done = done | ban.all(-1)
        ban[done] = False  # keep the distribution defined for finished rows; their samples are discarded
        lp = shape_logits(logits, temperature, top_k, top_p, ban)
        if force is not None:
            nxt = forced[:, step] if step < forced.shape[1] else torch.zeros_like(depth)
        elif temperature and temperature > 0:
            nxt = sample(lp, gen)
        else:
            nxt = lp.argmax(-1)
        live = ~done
        actions.append(nxt); logprobs.append(lp[rows, nxt]); alive.append(live)
        if return_logits:
            kept_logits.append(logits)
        is_bk = live & (nxt == bk)
        pop = is_bk & (depth > 0)
        push = live & ~is_bk
        if on_step is not None:   # streaming reads each row's action: one sync, only when asked
            popped = stack[rows, (depth - 1).clamp(min=0)]
            for b in live.nonzero().flatten().tolist():
                on_step(b, int(nxt[b]), int(popped[b]) if pop[b] else None)
        # a pop from depth d+1 to d: the popped token's own retry count and bans go with it; the
        # token is banned at depth d (rewind) and depth d counts one more retry
        d = depth - pop.long()
        clear = torch.where(pop, d + 1, D - 1)   # rows that do not pop clear the spare column
        retries[rows, clear] = 0
        ban_n[rows, clear] = 0
        retries[rows, d] += pop.long()
        if policy == "rewind" and slot_bans:
            slot = ban_n[rows, d].clamp(max=K - 1)
            ban_tok[rows, d, slot] = torch.where(pop, stack[rows, d], ban_tok[rows, d, slot])
            ban_n[rows, d] += pop.long()
        n_bk += is_bk.long()
        stack[rows, depth.clamp(max=D - 1)] = torch.where(push, nxt, stack[rows, depth.clamp(max=D - 1)])
        depth = d + push.long()
        write = push if policy == "rewind" else live
        if policy == "rewind":
            cache.pop(pop)
        ended = (step + 1 >= force_len) if force is not None else torch.isin(nxt, stops)
        over = cache.lengths + write.long() >= max_len
        finish = live & (ended | over)
        done = done | finish
        write = write & ~finish
        if bool(done.all()):
            break
        # one batched forward; rows that rewound or finished write a dummy token past their
        # length (a slot nothing attends to) and do not advance
        tok = torch.where(write, nxt, torch.zeros_like(nxt)).unsqueeze(1)
        pos = cache.lengths.clone().clamp(max=max_len - 1).unsqueeze(1)
        model.hidden(tok, pos, cache=cache)
        cache.lengths += write.long()
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
