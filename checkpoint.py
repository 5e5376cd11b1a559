"""
Checkpoints: building a run's model (from scratch, a checkpoint of this project, or a Hugging Face
folder that meets the backtrack token here), saving it atomically with everything an exact resume
needs, restoring that state, and loading a checkpoint with its tokenizer for the later stages.
The file format itself (weights, config.json, meta) is model.GPT.save / from_pretrained.
"""
import os
from dataclasses import asdict

import torch

from common import JsonlLog, sharded
from hf import padded_vocab
from model import GPT, GPTConfig, init_bk_embedding, set_dropout, unwrap
from tokenizer import copy_tokenizer_files, declared_eos_ids, get_tokenizer, has_tokenizer_files, hf_tokenizer_ids

# -----------------------------------------------------------------------------
# building and loading


def build_model(cfg, tok, device):
    """Returns (model, meta) for cfg.init_from; the tokenizer must match the checkpoint."""
    if cfg.init_from == "scratch":
        mc = GPTConfig(block_size=cfg.block_size, vocab_size=padded_vocab(tok.n_vocab), n_layer=cfg.n_layer,
                       n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, pos=cfg.pos, tokenizer=cfg.tokenizer,
                       n_vocab=tok.n_vocab, eot_id=tok.eot_id, bk_id=tok.bk_id)
        return GPT(mc), {}
    path = cfg.out_dir if cfg.init_from == "resume" else cfg.init_from
    model = GPT.from_pretrained(path, tok_ids=hf_tokenizer_ids(path))
    c = model.config
    c.tokenizer = tokenizer_path(c.tokenizer, path)
    fresh_bk = getattr(model, "meta", {}).get("format") != "backtrack-gpt"
    if fresh_bk:  # a Hugging Face model: the backtrack token is new to it
        c.tokenizer = cfg.tokenizer
        if (tok.bk_id, tok.eot_id) != (c.bk_id, c.eot_id) and tok.bk_id >= c.vocab_size:
            raise SystemExit(f"error: tokenizer {cfg.tokenizer!r} (bk id {tok.bk_id}) does not fit {path} "
                             f"(vocab {c.vocab_size})")
        c.bk_id, c.eot_id, c.n_vocab = tok.bk_id, tok.eot_id, max(tok.n_vocab, c.n_vocab)
        init_bk_embedding(model, tok, method=cfg.bk_init, seed=cfg.seed)
    elif (tok.bk_id, tok.eot_id) != (c.bk_id, c.eot_id):
        raise SystemExit(f"error: --tokenizer={cfg.tokenizer} has bk/eot ids ({tok.bk_id}, {tok.eot_id}) but "
                         f"{path}/config.json records ({c.bk_id}, {c.eot_id})")
    if cfg.dropout != c.dropout:
        set_dropout(model, cfg.dropout)
    return model.train(), getattr(model, "meta", {})


def load_model(path, device="cpu", dtype=torch.float32, chat=True):
    """A checkpoint folder (this project's, or a Hugging Face one) with its tokenizer: (model, tok).
    A Hugging Face folder's own tokenizer decides its end-of-text and BK ids, so the two agree. A
    tokenizer recorded relative to the checkpoint (its own copy) is resolved, and the model's config
    names the resolved path from then on. Prompts are rendered with the tokenizer's chat template
    (tok.chat) when it has one, unless chat=False or the checkpoint was trained with --chat=False."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no checkpoint at {path!r} (no config.json there)")
    model = GPT.from_pretrained(path, device=device, dtype=dtype, tok_ids=hf_tokenizer_ids(path))
    c = model.config
    c.tokenizer = tokenizer_path(c.tokenizer, path)
    trained_chat = getattr(model, "meta", {}).get("train_config", {}).get("chat", True)
    tok = get_tokenizer(c.tokenizer, chat=chat and trained_chat)
    if (tok.bk_id, tok.eot_id) != (c.bk_id, c.eot_id):
        raise ValueError(f"tokenizer {c.tokenizer!r} does not match {path}/config.json "
                         f"(bk {tok.bk_id} vs {c.bk_id}, eot {tok.eot_id} vs {c.eot_id})")
    return model, tok


def load_stage_model(path, device, stage, chat=True):
    """The starting model of a later stage (GRPO, DPO): a checkpoint of this project, which already
    knows the backtrack token, in train mode with dropout off (rollouts, references and the
    recomputed log-probs must see the same network). Returns (model, tok, meta)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"error: no checkpoint at {path!r}: train one first (python train_sft.py) "
                         "or pass --init_from=/path/to/checkpoint")
    model, tok = load_model(path, device, chat=chat)
    if model.meta.get("format") != "backtrack-gpt":
        raise SystemExit(f"error: {path} is not a checkpoint of this project (train_sft.py writes one); "
                         f"{stage} starts from a model that already knows the backtrack token")
    set_dropout(model, 0.0)
    return model.train(), tok, model.meta


def tokenizer_path(tokenizer, ckpt):
    """Where a checkpoint's recorded tokenizer is: 'byte', 'gpt2', a folder relative to the checkpoint
    (its own copy: ".", see save_checkpoint), or, as older checkpoints recorded it, any other path."""
    if tokenizer in ("byte", "gpt2") or os.path.isabs(tokenizer):
        return tokenizer
    inside = os.path.normpath(os.path.join(ckpt, tokenizer))
    return os.path.abspath(inside) if has_tokenizer_files(inside) else tokenizer

def starting_values(model, path, bk_id):
    """The values the trainable tensors of `model` have in the checkpoint at `path`, read from its
    file: [(tensor, row or None, value)]. An embedding table that trains only in the BK row
    (training.choose_trainable) gives that row; a LoRA adapter the checkpoint lacks (added by this
    stage) starts at B = 0."""
    from safetensors import safe_open
    out = []
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        have = set(f.keys())
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith(("wte.weight", "lm_head.weight")):
                key = name if name in have else "transformer.wte.weight"   # a tied head is saved as wte
                out.append((p, bk_id, f.get_slice(key)[bk_id:bk_id + 1][0].to(p)))
            elif name in have:
                out.append((p, None, f.get_tensor(name).to(p)))
            elif name.endswith(".lora.B"):
                out.append((p, None, torch.zeros_like(p)))
    return out

# -----------------------------------------------------------------------------
# saving and resuming


def save_checkpoint(model, optimizer, step, cfg, extra_meta=None, log=None):
    """Model + optimizer + RNG state, written atomically through GPT.save; with the length of the
    metrics log at this point, so that a resume replays no logged step twice.

    Self-contained: when the model's tokenizer is a Hugging Face folder, its files (and chat template,
    and the end ids it declares, in generation_config.json) are copied into the checkpoint, which
    records its tokenizer as "." (itself), so a moved checkpoint still loads (load_model). They are
    copied before GPT.save, which carries them into the new folder with the rest."""
    raw = unwrap(model)
    sd, osd = None, optimizer.state_dict()
    if sharded(raw):   # every rank calls: the full weights and optimizer state are gathered from the shards
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(raw, options=opts)
        # before the first step the optimizer has no state, and asking for it would make one by a
        # zero-gradient step (AdamW's step count would then run one ahead): save it empty instead
        osd = get_optimizer_state_dict(raw, optimizer, options=opts) if optimizer.state else None
    if int(os.environ.get("RANK", 0)) != 0:
        return
    state = dict(optimizer=osd, step=step, torch_rng=torch.get_rng_state(), sharded=sharded(raw),
                 metrics_lines=log.lines() if log is not None else None)
    meta = dict(step=step, train_config=asdict(cfg), **(extra_meta or {}))
    c = raw.config
    src = c.tokenizer
    if c.tokenizer not in ("byte", "gpt2") and has_tokenizer_files(src):
        os.makedirs(cfg.out_dir, exist_ok=True)
        stops = [c.eot_id] + [i for i in declared_eos_ids(src) if i not in (c.eot_id, c.bk_id)]
        copy_tokenizer_files(src, cfg.out_dir, stops)
        c.tokenizer = "."
    try:
        raw.save(cfg.out_dir, meta=meta, files={"train_state.pt": state}, state_dict=sd)
    finally:
        c.tokenizer = src


def load_train_state(path):
    f = os.path.join(path, "train_state.pt")
    if not os.path.exists(f):
        raise SystemExit(f"error: {path} has no train_state.pt to resume from")
    return torch.load(f, weights_only=False)


def restore(model, optimizer, cfg, resuming, master):
    """When resuming, load the optimizer and RNG state saved with out_dir's checkpoint.
    Returns (the step to start from, the metrics log of the run, cut back to that step)."""
    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if not resuming:
        return 0, JsonlLog(path, master)
    st = load_train_state(cfg.out_dir)
    if st.get("sharded") and st["optimizer"] is None:   # saved before the first step: nothing to restore
        pass
    elif st.get("sharded"):   # saved whole from FSDP shards; each rank takes its own shard back
        if not sharded(unwrap(model)):
            raise SystemExit(f"error: {cfg.out_dir} was trained with --fsdp=True under torchrun: resume it so")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(unwrap(model), optimizer, st["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(st["optimizer"])
    torch.set_rng_state(st["torch_rng"])
    if master:
        print(f"resuming from {cfg.out_dir} at step {st['step']}")
    return st["step"], JsonlLog(path, master, keep_lines=st.get("metrics_lines"))
