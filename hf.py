"""
Hugging Face checkpoint folders: reading their config.json into our model config, mapping their
tensor names and layouts onto ours, and writing our models back out in their layout (GPT-2 or
Llama/Qwen), so that `transformers` and other tools open them.

Only the model's file formats live here: no model code (model.py), and no tokenizer code or files
(tokenizer.py, which also writes an export's tokenizer files with <|BACKTRACK|> in them).
"""
import json
import os

import torch
from safetensors.torch import save_file

from common import read_json
from tokenizer import add_bk_token, copy_tokenizer_files, declared_eos_ids, has_tokenizer_files, write_byte_tokenizer

def padded_vocab(n, multiple=64):
    """Embedding tables are padded to a multiple of 64 rows (faster matmuls); rows past the
    tokenizer's vocabulary are never produced."""
    return ((n + multiple - 1) // multiple) * multiple

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# (ours, theirs) substrings for the Llama family; q/k/v are fused into one c_attn here
LLAMA_NAMES = [
    ("transformer.wte.", "model.embed_tokens."), ("transformer.ln_f.", "model.norm."),
    ("transformer.h.", "model.layers."), (".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm."),
    (".attn.c_attn.", ".self_attn.qkv."), (".attn.c_proj.", ".self_attn.o_proj."),
    (".attn.q_norm.", ".self_attn.q_norm."), (".attn.k_norm.", ".self_attn.k_norm."),
    (".mlp.c_fc.", ".mlp.up_proj."), (".mlp.c_proj.", ".mlp.down_proj."), (".mlp.gate_proj.", ".mlp.gate_proj."),
]


def safetensors_files(path):
    idx = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(idx):
        return sorted(set(read_json(idx)["weight_map"].values()))
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return ["model.safetensors"]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}")


def config_from_hf(hf, where="config.json", tok=None):
    """GPTConfig fields (a dict) from a Hugging Face config.json. The table gets room for the backtrack token:
    it takes id = the checkpoint's vocab_size, and the table is padded to a multiple of 64.
    tok: the folder's tokenizer ids (tokenizer.hf_tokenizer_ids), when it has one: then eot and BK are the
    tokenizer's (BK on a reserved or unused row where the family has one), so the two always agree,
    and the table grows (padded) only when the tokenizer's ids run past it."""
    mt = hf.get("model_type")
    V = hf["vocab_size"]
    eot = hf.get("eos_token_id")
    eot = eot[0] if isinstance(eot, list) else eot
    common = dict(vocab_size=padded_vocab(V + 1), n_vocab=V + 1, bk_id=V,
                  eot_id=eot if eot is not None else V - 1, tokenizer=hf.get("backtrack_tokenizer", "gpt2" if mt == "gpt2" else mt))
    if "backtrack_token_id" in hf:  # a folder this project exported: the table already holds BK
        common.update(vocab_size=V, n_vocab=V, bk_id=hf["backtrack_token_id"])
    if tok is not None:
        common.update(vocab_size=V if tok["n_vocab"] <= V else padded_vocab(tok["n_vocab"]), n_vocab=tok["n_vocab"],
                      eot_id=tok["eot_id"], bk_id=tok["bk_id"], tokenizer=tok["path"])
    if mt == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{where}: activation {hf['activation_function']!r} is not supported")
        return dict(block_size=hf["n_positions"], n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                         n_inner=hf.get("n_inner") or 0, norm_eps=hf.get("layer_norm_epsilon", 1e-5), **common)
    if mt in ("llama", "qwen2", "qwen3", "mistral"):
        rp = hf.get("rope_parameters") or {}
        rs = hf.get("rope_scaling") or {}
        if rp.get("rope_type", "default") != "default":
            rs = rp
        theta = rp.get("rope_theta", hf.get("rope_theta", 10000.0))
        if rs and rs.get("rope_type", rs.get("type")) not in ("llama3", "default", None):
            raise ValueError(f"{where}: rope scaling {rs} is not supported")
        return dict(block_size=hf.get("max_position_embeddings", 4096), n_layer=hf["num_hidden_layers"],
                         n_head=hf["num_attention_heads"], n_kv_head=hf.get("num_key_value_heads") or 0,
                         n_embd=hf["hidden_size"], head_dim=hf.get("head_dim") or 0, n_inner=hf["intermediate_size"],
                         bias=False, qkv_bias=bool(hf.get("attention_bias", mt == "qwen2")),
                         norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", pos="rope",
                         rope_theta=theta, rope_scaling=dict(rs) if rs.get("rope_type", rs.get("type")) == "llama3" else {},
                         qk_norm=(mt == "qwen3"), tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **common)
    raise ValueError(f"{where}: model_type {mt!r} is not supported (gpt2, llama, qwen2, qwen3)")


def convert_hf_tensor(k, t, cfg):
    """Map one Hugging Face tensor to [(our name, tensor)]; q/k/v pieces are gathered until whole."""
    if cfg.pos == "learned":  # GPT-2
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            return []
        if not k.startswith("transformer.") and not k.startswith("lm_head."):
            k = "transformer." + k
        if any(k.endswith(c) for c in CONV1D):
            t = t.t()
        return [(k, t)]
    for ours, theirs in LLAMA_NAMES:
        k = k.replace(theirs, ours)
    for part in ("q_proj", "k_proj", "v_proj"):
        if f".self_attn.{part}." in k:
            key = k.replace(f".self_attn.{part}.", ".attn.c_attn.")
            buf = _QKV.setdefault(key, {})
            buf[part] = t
            if len(buf) < 3:
                return []
            del _QKV[key]
            return [(key, torch.cat([buf["q_proj"], buf["k_proj"], buf["v_proj"]], dim=0))]
    return [(k.replace(".self_attn.", ".attn."), t)]


_QKV = {}  # q/k/v pieces waiting for their siblings (they may sit in different shards)


def write_folder(cfg, state_dict, path):
    """Write a Hugging Face folder (config.json + model.safetensors) from our config and state dict:
    GPT-2 layout (Conv1D weights stored (in, out)) or Llama layout, by the config. With the model's
    tokenizer files too when it has them: a Hugging Face tokenizer folder (cfg.tokenizer, as
    checkpoint.load_model resolves it) is copied with <|BACKTRACK|> added at cfg.bk_id (add_bk_token), and
    the byte tokenizer is written out; GPT-2's BPE ranks are not (no merges list ships with them)."""
    os.makedirs(path, exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in state_dict.items()}
    out = {}
    if cfg.pos == "learned":
        for k, v in sd.items():
            if k == "lm_head.weight":
                continue
            if any(k.endswith(c) for c in CONV1D):
                v = v.t()
            out[k] = v.contiguous()
        hf = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size,
                  n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                  n_inner=cfg.n_inner, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                  tie_word_embeddings=True, bos_token_id=cfg.eot_id, eos_token_id=cfg.eot_id)
    else:
        H, K, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        for k, v in sd.items():
            for ours, theirs in reversed(LLAMA_NAMES):
                k = k.replace(ours, theirs)
            if k.endswith("self_attn.qkv.weight") or k.endswith("self_attn.qkv.bias"):
                q, kk, vv = v.split([H * D, K * D, K * D], dim=0)
                b = k.rsplit(".", 1)[-1]
                pre = k[: -len("qkv." + b)]
                out[pre + "q_proj." + b], out[pre + "k_proj." + b], out[pre + "v_proj." + b] = q, kk, vv
            else:
                out[k] = v
        if cfg.tie_embeddings:
            out.pop("lm_head.weight", None)
        out = {k: v.contiguous() for k, v in out.items()}
        hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=cfg.vocab_size,
                  hidden_size=cfg.n_embd, intermediate_size=cfg.n_inner, num_hidden_layers=cfg.n_layer,
                  num_attention_heads=H, num_key_value_heads=K, head_dim=D, rms_norm_eps=cfg.norm_eps,
                  max_position_embeddings=cfg.block_size, rope_theta=cfg.rope_theta,
                  rope_scaling=cfg.rope_scaling or None, tie_word_embeddings=cfg.tie_embeddings,
                  attention_bias=cfg.qkv_bias, hidden_act="silu", bos_token_id=cfg.eot_id, eos_token_id=cfg.eot_id)
        if cfg.qk_norm:
            hf.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False)
        elif cfg.qkv_bias:
            hf.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    hf.update(torch_dtype="float32", backtrack_token_id=cfg.bk_id)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if has_tokenizer_files(cfg.tokenizer):
        stops = [cfg.eot_id] + [i for i in declared_eos_ids(cfg.tokenizer) if i not in (cfg.eot_id, cfg.bk_id)]
        copy_tokenizer_files(cfg.tokenizer, path, stop_ids=stops)
        add_bk_token(path, cfg.bk_id)
    elif cfg.tokenizer == "byte" and (cfg.eot_id, cfg.bk_id, cfg.n_vocab) == (256, 257, 258):
        write_byte_tokenizer(path, cfg.eot_id, cfg.bk_id, cfg.block_size)
    elif os.sep in cfg.tokenizer or cfg.tokenizer.startswith("."):   # a path (not a family name like "llama")
        import warnings
        warnings.warn(f"tokenizer {cfg.tokenizer!r} is not a folder with tokenizer files here: {path} gets no "
                      "tokenizer (load the model with checkpoint.load_model, which resolves a checkpoint's own)")
