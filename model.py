"""
The transformer, its KV cache, and the head that turns its logits into actions (bans, log-probs,
the SFT loss). Generation, which drives the cache, is decode.py.

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
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import hf
from common import read_json


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
    # LoRA adapters (add_lora): rank 0 = none. Recorded here so a checkpoint with adapters rebuilds them
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "attn,mlp"  # attn: the fused q/k/v and the output projection; mlp: its linears
    # the verifier head (add_verifier): one logit per position, that the surviving response has gone wrong
    verifier: bool = False
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
    # x (B, T, H, D), cos/sin (B, T, 1, D); the Hugging Face layout rotates the two halves of each head
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def linear(m, x, weights=None):
    """m(x) for an nn.Linear m, plus its LoRA adapter's term when it has one. weights: in CPU
    decoding, {nn.Linear: a copy of its weight that reads faster} (decode.decode_weights): packed
    for oneDNN, or stored transposed; a linear without a copy uses its own weight."""
    w = weights.get(m) if weights is not None else None
    if w is None:
        y = m(x)
    elif w.is_mkldnn:
        y = torch.ops.mkldnn._linear_pointwise(x, w, m.bias, "none", [], "")
    else:
        y = F.linear(x, w, m.bias)
    lora = m._modules.get("lora")   # a dict lookup, not getattr: this runs for every linear of every decode step
    return y if lora is None else y + lora(x)


class LoRA(nn.Module):
    """A low-rank adapter beside a frozen linear (Hu et al. 2021): y += (alpha / rank) * B A x.
    A starts as nn.Linear's own init, B at zero, so an adapted model starts exactly as its base.
    Lives at `<linear>.lora` (add_lora) and is added by `linear`; merge_lora folds it in."""

    def __init__(self, n_in, n_out, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, n_in))
        self.B = nn.Parameter(torch.zeros(n_out, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x):
        return F.linear(F.linear(x, self.A), self.B) * self.scale

    def delta(self):
        """The adapter as a weight update (n_out, n_in), in fp32."""
        return (self.B.float() @ self.A.float()) * self.scale


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

    def forward(self, x, rope, mask, write=None, layer=0, weights=None):
        """write: the CacheWrite of a cached forward (KVCache.begin), None without a cache; layer:
        this block's index in the cache; weights: decoding's weight copies (linear)."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, K, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        q, k, v = linear(self.c_attn, x, weights).split([H * D, K * D, K * D], dim=-1)
        # heads stay in the (B, T, heads, D) layout until attention: the cache takes k and v in it
        q, k, v = q.view(B, T, H, D), k.view(B, T, K, D), v.view(B, T, K, D)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q = q.transpose(1, 2)
        if write is not None:
            k, v = write.store(layer, k, v)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        drop = self.dropout if self.training else 0.0
        # grouped-query heads share their k/v inside the kernel: no copy of the cache span per step
        gqa = dict(enable_gqa=True) if K != H else {}
        if mask is None and write is None:   # a plain chain: the fused causal kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop, **gqa)
        else:   # a tree mask (B, 1, T, T), or a cached step's (None: every query sees the whole span)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, **gqa)
        y = linear(self.c_proj, y.transpose(1, 2).reshape(B, T, H * D), weights)
        return F.dropout(y, drop, True) if drop > 0 else y


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            self.gate_proj = nn.Linear(cfg.n_embd, cfg.n_inner, bias=cfg.bias)
        self.c_fc = nn.Linear(cfg.n_embd, cfg.n_inner, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_inner, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x, weights=None):
        if self.kind == "swiglu":
            h = F.silu(linear(self.gate_proj, x, weights)) * linear(self.c_fc, x, weights)
        else:
            h = F.gelu(linear(self.c_fc, x, weights), approximate="tanh")
        h = linear(self.c_proj, h, weights)
        return F.dropout(h, self.dropout, True) if self.training and self.dropout > 0 else h


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = make_norm(cfg, cfg.n_embd)
        self.attn = Attention(cfg)
        self.ln_2 = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, write=None, layer=0, weights=None):
        x = x + self.attn(self.ln_1(x), rope, mask, write, layer, weights)
        return x + self.mlp(self.ln_2(x), weights)

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
        # h[:, L]: the final hidden state of slot L - 1, the one a row of length L predicts its next
        # token from (so it is read at the length itself; h[:, 0] is unused)
        self.h = torch.zeros(batch_size, max_len + 1, cfg.n_embd, device=device, dtype=dtype)
        self.h_of_slot = self.h[:, 1:]   # a view: indexed by slot, where a forward writes
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        # made once, not per step: every write indexes by row, every mask compares slots, and each
        # layer's views (a decode step of a small model is bound by the number of tensor calls)
        self.rows = torch.arange(batch_size, device=device).unsqueeze(1)
        self.layers = [(self.k[i], self.v[i]) for i in range(cfg.n_layer)]
        self.slots = torch.arange(max_len, device=device)
        self.rope = None
        if cfg.pos == "rope":   # cos/sin of every slot, computed as GPT.hidden does, so a step only gathers
            f = self.slots.unsqueeze(-1).float() * rope_inv_freq(cfg).to(device)
            f = torch.cat((f, f), dim=-1)
            self.rope = (f.cos(), f.sin())

    def begin(self, pos):
        """The CacheWrite of a forward that writes tokens at positions pos (B, T): the span of slots
        they attend over and its attention mask."""
        low, top = torch.stack(torch.aminmax(pos)).tolist()   # one host read per forward
        if top >= self.max_len:
            raise ValueError(f"KV cache is full: position {top} >= max_len {self.max_len}")
        span = top + 1
        # one token per row, every row at the same slot (batch 1, or rows that never rewound): each
        # query sits at the top of the span and sees all of it, so no mask is built or applied
        aligned = pos.shape[1] == 1 and low == top
        mask = None if aligned else (self.slots[:span] <= pos.unsqueeze(-1)).unsqueeze(1)
        return CacheWrite(self, pos, span, mask)

    def write(self, layer, k, v, pos, span):
        """Store one layer's k, v (B, T, K, D) at slots pos; return that layer's keys and values over
        slots 0..span-1, (B, K, span, D)."""
        ck, cv = self.layers[layer]
        rows = self.rows if k.shape[0] == self.rows.shape[0] else self.rows[:k.shape[0]]
        dt = k.dtype
        if dt != ck.dtype:   # a cache kept in another dtype than the model computes in
            k, v = k.to(ck.dtype), v.to(ck.dtype)
        # advanced indices on dims 0 and 2 around a slice: the indexed view is (B, T, K, D)
        ck[rows, :, pos] = k
        cv[rows, :, pos] = v
        ck, cv = ck[:, :, :span], cv[:, :, :span]
        return (ck, cv) if dt == ck.dtype else (ck.to(dt), cv.to(dt))

    def pop(self, rows, n=1):
        """Free the top n slots of the given rows (bool mask or index tensor): the `rewind` policy's
        deletion (docs/backtrack-semantics.md §3). In place, O(1), rows independent."""
        if rows.dtype == torch.bool:   # a mask over every row: one subtraction, no gather (no device sync)
            self.lengths.sub_(rows.long(), alpha=n)
        else:
            self.lengths[rows] -= n


class CacheWrite(NamedTuple):
    """One cached forward, as KVCache.begin sets it up: every layer stores its keys and values at
    pos (B, T) and attends over slots 0..span-1, under mask (B, 1, T, span; None: every query sees
    the whole span). GPT.hidden passes it down to each layer's attention."""
    cache: KVCache
    pos: torch.Tensor
    span: int
    mask: Optional[torch.Tensor]

    def store(self, layer, k, v):
        return self.cache.write(layer, k, v, self.pos, self.span)

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
        # beside lm_head, on the same final hidden state: is the last surviving token an error? (add_verifier)
        self.verifier = nn.Linear(cfg.n_embd, 1) if cfg.verifier else None
        self.apply(self._init_weights)
        for n, p in self.named_parameters():  # GPT-2: scaled init of the residual projections
            if n.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.lora_rank > 0:   # a checkpoint trained with adapters: rebuild them, their values are loaded
            add_lora(self, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)

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

    def hidden(self, idx, pos=None, mask=None, cache=None, weights=None):
        """Final hidden states (after the last norm), (B, T, C).

        pos: (B, T) position ids (default 0..T-1). mask: (B, T, T) bool, True = may attend
        (default causal). With a cache, tokens are written at slots pos and attend to slots
        <= their position; the cache's lengths are left for the caller to move. weights: the
        weight copies CPU decoding reads (decode.decode_weights; see linear).
        """
        B, T = idx.shape
        if pos is None:
            pos = torch.arange(T, device=idx.device).expand(B, T)
        write = cache.begin(pos) if cache is not None else None   # its mask replaces `mask`
        top = write.span - 1 if write is not None else None
        if self.config.pos == "learned":
            top = int(pos.max()) if top is None else top
            if top >= self.config.block_size:
                raise ValueError(f"position {top} exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(idx)
        rope = None
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(pos)
        elif cache is not None:   # the cache holds every slot's cos/sin: gather, do not recompute
            rope = (cache.rope[0][pos].unsqueeze(2).to(x.dtype), cache.rope[1][pos].unsqueeze(2).to(x.dtype))
        else:
            f = pos.unsqueeze(-1).float() * self.inv_freq          # (B, T, D/2)
            f = torch.cat((f, f), dim=-1).unsqueeze(2)              # (B, T, 1, D)
            rope = (f.cos().to(x.dtype), f.sin().to(x.dtype))
        if self.training and self.config.dropout > 0:
            x = F.dropout(x, self.config.dropout, True)
        mask = write.mask if write is not None else None if mask is None else mask.unsqueeze(1)   # (B, 1, T, S)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, mask, write, i, weights)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.h_of_slot[cache.rows if B == cache.rows.shape[0] else cache.rows[:B], pos] = \
                x if x.dtype == cache.h.dtype else x.to(cache.h.dtype)
        return x

    def forward(self, idx, pos=None, mask=None, cache=None, act=None, verify=False):
        """Logits (B, T, vocab_size); with act=(rows, cols), only those nodes' logits (A, vocab_size):
        in training only the nodes that act go through lm_head, most of the cost at large vocab.
        verify: also the verifier head's logits on the same nodes, (B, T) or (A,): (logits, verifier)."""
        h = self.hidden(idx, pos, mask, cache)
        if act is not None:
            h = h[act[0], act[1]]
        if verify:
            return self.lm_head(h), self.verifier(h).squeeze(-1)
        return self.lm_head(h)

    def action_logits(self, batch):
        return action_logits(self, batch)

    # -- checkpoints -----------------------------------------------------------

    def save(self, path, meta=None, files=None, state_dict=None):
        """Write the project's checkpoint folder atomically: model.safetensors + config.json
        (the model config, tokenizer and backtrack id, plus `meta`), and `files` (name -> object,
        e.g. optimizer state) through torch.save. Everything is written to a temporary folder,
        then renamed over the old one, so a crash never leaves a half-written checkpoint. Other
        files in the folder (a run's metrics.jsonl) move into the new folder first. state_dict:
        the weights to write, when this module holds only shards of them (FSDP)."""
        from safetensors.torch import save_file
        path = path.rstrip("/")
        tmp, old = path + ".tmp", path + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in (state_dict or self.state_dict()).items()
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
        model takes its end-of-text and BK ids from its own tokenizer; checkpoint.load_model passes them."""
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"no config.json in checkpoint folder {path!r}")
        meta = read_json(cfg_path)
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
        GPT-2 layout or Llama layout, by the config (hf.write_folder). LoRA adapters are merged
        into the weights they adapt; the model itself is left as it is. The verifier head is left out:
        a Hugging Face causal LM has no place for it (the checkpoint of this project keeps it)."""
        sd = {k: v for k, v in merged_state_dict(self).items() if not k.startswith("verifier.")}
        hf.write_folder(self.config, sd, path)

# -----------------------------------------------------------------------------
# LoRA: adapters on the block linears, trained while the rest is frozen (training.choose_trainable)

LORA_TARGETS = {"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.gate_proj", "mlp.c_fc", "mlp.c_proj")}


def lora_targets(targets):
    """The names of the linears (inside a block) that `targets` ("attn", "mlp" or "attn,mlp") adapts."""
    parts = [t.strip() for t in targets.split(",") if t.strip()]
    if not parts or any(t not in LORA_TARGETS for t in parts):
        raise ValueError(f"--lora_targets={targets}: expected attn, mlp or attn,mlp")
    return [n for t in parts for n in LORA_TARGETS[t]]


def add_lora(model, rank, alpha, targets):
    """Give each target linear of every block a LoRA adapter (B = 0: the model's outputs do not change)
    and record the settings in the config, so checkpoints rebuild them. Freezing is the caller's."""
    names = lora_targets(targets)
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters (merge_lora first to add others)")
    if rank < 1:
        raise ValueError(f"--lora_rank={rank}: must be at least 1")
    for block in model.transformer.h:
        for name in names:
            parent, _, leaf = name.partition(".")
            m = getattr(block.get_submodule(parent), leaf, None)
            if m is not None:   # gate_proj exists under SwiGLU only
                w = m.weight
                m.lora = LoRA(m.in_features, m.out_features, rank, alpha).to(device=w.device, dtype=w.dtype)
    model.config.lora_rank, model.config.lora_alpha, model.config.lora_targets = rank, alpha, targets
    return model


def add_verifier(model):
    """Give a model without one the verifier head (a linear from the final hidden state to one logit,
    initialised as the other linears), and record it in the config so that checkpoints rebuild it."""
    if model.verifier is None:
        w = model.lm_head.weight
        model.verifier = nn.Linear(model.config.n_embd, 1).to(device=w.device, dtype=w.dtype)
        model._init_weights(model.verifier)
        model.config.verifier = True
    return model


def lora_modules(model):
    """(name, LoRA) of every adapter of the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRA)]


def merged_state_dict(model):
    """The state dict with each adapter folded into its linear's weight and the adapters' own
    entries left out: the weights of the base model that computes what the adapted one does."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora." not in k}
    for name, lora in lora_modules(model):
        key = name[: -len("lora")] + "weight"
        sd[key] = (sd[key].float() + lora.delta().to(sd[key].device)).to(sd[key].dtype)
    return sd


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its weight, in place, and remove it: a plain model again."""
    for name, lora in lora_modules(model):
        m = model.get_submodule(name[: -len(".lora")])
        m.weight.copy_((m.weight.float() + lora.delta()).to(m.weight.dtype))
        del m.lora
    model.config.lora_rank = 0
    return model

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


def ban_(logits, ban=None, n_vocab=None):
    """Set the banned entries of logits (A, V) to -inf, in place, touching only those entries:
    the table padding (ids >= n_vocab) by one strided slice write, and the (row, token) pairs of
    ban, a pair of index tensors (backtrack bans and caps), by one index_put. No dense (A, V)
    ban matrix is ever built: at GPT-2's vocabulary it cost as much as the softmax."""
    if n_vocab is not None and n_vocab < logits.shape[-1]:
        logits[:, n_vocab:] = float("-inf")
    if ban is not None and ban[0].numel():
        logits[ban] = float("-inf")
    return logits


def filtered(top_k, top_p, vocab_size):
    """Whether top-k or top-p removes anything (then the distribution needs sorting)."""
    return bool(top_k and top_k < vocab_size) or (top_p is not None and top_p < 1.0)


def shape_logits(logits, temperature=1.0, top_k=0, top_p=1.0, ban=None, n_vocab=None):
    """Return log-probs of the distribution actually sampled from.

    ban: the banned (row, token) pairs, a pair of index tensors (backtrack bans and caps);
    n_vocab: ids >= n_vocab (table padding) are banned as well (ban_). logits are not modified.
    Order: bans, temperature, top-k, top-p. Greedy (temperature 0) uses the banned logits' argmax
    and is scored at temperature 1. Log-probs of filtered tokens are -inf.
    """
    if ban is not None or n_vocab is not None:
        logits = ban_(logits.to(torch.float32, copy=True), ban, n_vocab)   # a copy: ours to write into
    if logits.dtype != torch.float32:
        logits = logits.float()
    if temperature and temperature > 0 and temperature != 1:   # x / 1.0 == x: skip a full pass
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


def action_logits(model, batch, verify=False):
    """Logits for the actions of a collated batch (data.collate): (A, vocab_size); verify: also the
    verifier head's (A,). `model` may be wrapped (DDP, torch.compile): the call goes through its
    forward so gradient sync works; without verify the call is the plain one any model-like module takes."""
    act = (batch.act_row, batch.act_src)
    if verify:
        return model(batch.ids, batch.pos, batch.mask, act=act, verify=True)
    return model(batch.ids, batch.pos, batch.mask, act=act)


def unwrap(model):
    """The GPT inside a DDP and/or torch.compile wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def set_dropout(model, p):
    """Set the dropout of a model and of every layer that has one (they copied the config's value
    when built), and record it in the config, so that checkpoints keep it."""
    model.config.dropout = p
    for m in model.modules():
        if hasattr(m, "dropout"):
            m.dropout = p
    return model


def action_logprobs(model, batch, temperature=1.0, top_k=0, top_p=1.0):
    return logprobs_of(action_logits(model, batch), batch, unwrap(model).config.n_vocab, temperature, top_k, top_p)


def logprobs_of(logits, batch, n_vocab, temperature=1.0, top_k=0, top_p=1.0):
    """Log-prob of every action of a collated batch under the sampled distribution: (A,).

    Without top-k/top-p this is one fused F.cross_entropy over the logits with the bans written
    in: the same numbers as log_softmax + gather (bit for bit), at the cost of a plain LM loss.
    The bans go into the logits' storage without autograd seeing them (.detach() shares it): a
    banned entry's probability is then exactly 0, so log_softmax's backward already sends it
    the zero gradient the recorded fill would have (a banned *target* would get -1 there, but
    its log-prob is -inf and every loss here gives such an action weight 0, so no gradient
    reaches it). Recording the fill would cost a copy of the (A, V) gradient in backward. This
    is safe because lm_head's backward needs its input and weight, never its output (autograd
    would raise if it did). With top-k/top-p the distribution needs a sort anyway: shape_logits."""
    tgt = batch.tgt
    ban = (batch.ban_act, batch.ban_tok)
    if filtered(top_k, top_p, logits.shape[-1]):
        return shape_logits(logits, temperature, top_k, top_p, ban, n_vocab).gather(1, tgt.unsqueeze(1)).squeeze(1)
    logits = logits.float()   # fp32 already: the very tensor lm_head returned, no copy
    ban_(logits.detach(), ban, n_vocab)
    if temperature and temperature > 0 and temperature != 1:
        logits = logits / temperature
    return -F.cross_entropy(logits, tgt, reduction="none")


def sft_loss(model, batch, normalizer=None):
    """Weighted cross-entropy over actions (masked errors have weight 0), divided by the total
    weight, or by `normalizer` (the whole global batch's weight, so that gradient accumulation
    and DDP give the same loss as one big batch)."""
    return weighted_nll(action_logprobs(model, batch), batch.weight, normalizer)


def weighted_nll(lp, w, normalizer=None):
    nll = torch.where(w > 0, -lp * w, torch.zeros_like(lp))  # a weight-0 action never adds 0 * inf
    return nll.sum() / (w.sum().clamp(min=1.0) if normalizer is None else normalizer)


def sft_verifier_loss(model, batch, normalizer=None, verifier_normalizer=None):
    """sft_loss and the verifier head's loss from one forward: (lm, verifier). The head is trained
    with binary cross-entropy to say, at each action, whether the last surviving response token is
    an error (batch.wrong: 1 = an ERROR token, popped later; 0 = a FINAL one; -1 = no response
    token yet, not scored; data.layout). lm is sft_loss's number exactly; the verifier part is a mean
    over the scored actions, or a sum over `verifier_normalizer` (the global batch's count)."""
    if unwrap(model).verifier is None:
        raise ValueError("sft_verifier_loss needs a model with a verifier head (model.add_verifier)")
    logits, v = action_logits(model, batch, verify=True)
    lm = weighted_nll(logprobs_of(logits, batch, unwrap(model).config.n_vocab), batch.weight, normalizer)
    y = batch.wrong
    scored = y >= 0
    bce = F.binary_cross_entropy_with_logits(v.float(), y.clamp(min=0), reduction="none")
    vloss = torch.where(scored, bce, torch.zeros_like(bce)).sum()
    return lm, vloss / (scored.sum().clamp(min=1) if verifier_normalizer is None else verifier_normalizer)


def completion_logprobs(model, batch):
    """Sum of log-probs over each row's completion actions (weight 1): (B,). The shared prefix
    contributes exactly nothing, even where its log-prob is -inf (a banned token)."""
    lp = action_logprobs(model, batch)
    w = batch.weight > 0
    lp = torch.where(w, lp, torch.zeros_like(lp))
    B = batch.ids.shape[0]
    return torch.zeros(B, device=lp.device, dtype=lp.dtype).index_add(0, batch.act_row, lp)
