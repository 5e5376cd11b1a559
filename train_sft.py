"""
Supervised fine-tuning on backtrack traces: the first stage, and the one every other stage starts from.

    python train_sft.py                                   # tiny model on `arith`, CPU, ~10 minutes
    python train_sft.py --policy=keep --mask_errors=False
    torchrun --standalone --nproc_per_node=2 train_sft.py --batch_size=16
    python train_sft.py --init_from=/path/to/hf/gpt2 --tokenizer=gpt2 --task=gsm8k
    python train_sft.py config.json --max_iters=100       # a config file (JSON or Python), then overrides

Each step draws a global batch of problems (a pure function of seed and step, so resume and DDP
are exact), turns a `backtrack_ratio` share into traces with errors and backtracks (at most the
curriculum's current number), and trains on the layout of the chosen context policy:
`rewind` (the error-hiding tree) or `keep` (plain causal over the raw trace). Error tokens carry no
loss unless --mask_errors=False.

This file also holds what every training stage shares: config parsing, DDP setup, atomic
checkpoints with exact resume, and JSONL logging.
"""
import ast
import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, asdict, fields

import torch
from tqdm import tqdm

from data import (Curriculum, Trace, build_traces, collate, get_task, get_tokenizer, layout, pack, read_jsonl)
from model import GPT, GPTConfig, init_bk_embedding, padded_vocab, sft_loss, unwrap


@dataclass
class Config:
    out_dir: str = "out/sft"
    init_from: str = "scratch"       # scratch | resume | path to a checkpoint folder (ours or Hugging Face)
    # task and data
    task: str = "arith"
    task_kwargs: str = ""            # e.g. "steps=3,digits=1" (passed to data.get_task)
    tokenizer: str = "byte"          # byte | gpt2 | path to a Hugging Face tokenizer folder
    policy: str = "rewind"           # rewind (errors leave the context) | keep (errors stay visible)
    mask_errors: bool = True         # no loss on predicting an error token
    backtrack_ratio: float = 0.5     # share of traces that contain errors and backtracks
    augment: str = "plausible"       # plausible | random | lcs (see data.build_traces)
    curriculum: str = "0:1,0.3:2,0.6:3"  # progress:max_backtracks phases
    n_train: int = 50000             # size of the training problem pool
    pack_rows: bool = False          # pack several short traces into one row of block_size
    traces_file: str = ""            # extra JSONL traces (e.g. the model's own errors) mixed into each batch
    traces_ratio: float = 0.0        # share of each batch drawn from traces_file
    # model (from scratch)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    block_size: int = 128
    dropout: float = 0.0
    bk_init: str = "description"     # mean | semantic | description (for pretrained models)
    # optimisation
    batch_size: int = 32             # traces per micro-batch per process
    grad_accum: int = 1
    max_iters: int = 3000
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    embedding_only: bool = False     # train only the backtrack token's rows (research notes 5.4)
    # evaluation and logging
    eval_interval: int = 500
    eval_n: int = 200
    eval_temperature: float = 1.0
    max_new_tokens: int = 96
    log_interval: int = 10
    save_interval: int = 500
    stop_at: int = 0                 # stop (and save) after this many steps, as if interrupted; 0 = run to max_iters
    # system
    seed: int = 1337
    device: str = "cpu"
    dtype: str = "float32"           # float32 | bfloat16 (autocast; for CUDA)
    compile: bool = False
    progress: bool = True


# -----------------------------------------------------------------------------
# shared run machinery


def configure(cfg, argv):
    """Apply an optional config file (.json or .py) and --key=value overrides to a dataclass.
    Values are parsed as Python literals where they parse, else kept as strings."""
    types = {f.name: f.type for f in fields(cfg)}
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.exists(arg):
                raise SystemExit(f"error: config file {arg!r} not found")
            if arg.endswith(".json"):
                with open(arg) as f:
                    items = json.load(f).items()
            else:
                scope = {}
                exec(open(arg).read(), {}, scope)
                items = [(k, v) for k, v in scope.items() if not k.startswith("_")]
            for k, v in items:
                _set(cfg, types, k, v, arg)
            continue
        if "=" not in arg:
            raise SystemExit(f"error: argument {arg!r} must look like --key=value")
        k, v = arg[2:].split("=", 1)
        try:
            v = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            pass
        _set(cfg, types, k, v, arg)
    return cfg


def _set(cfg, types, k, v, where):
    if k not in types:
        raise SystemExit(f"error: unknown config key {k!r} (from {where}); known: {', '.join(types)}")
    t = type(getattr(cfg, k))
    if t is bool and not isinstance(v, bool):
        raise SystemExit(f"error: {where}: {k} takes True or False, got {v!r}")
    if t is float and isinstance(v, int):
        v = float(v)
    if t is str and not isinstance(v, str):
        v = str(v)
    if not isinstance(v, t):
        raise SystemExit(f"error: {where}: {k} takes a {t.__name__}, got {v!r}")
    setattr(cfg, k, v)


def parse_kwargs(s):
    """'steps=3,digits=1' -> {'steps': 3, 'digits': 1}."""
    out = {}
    for part in filter(None, s.split(",")):
        k, _, v = part.partition("=")
        try:
            out[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            out[k.strip()] = v.strip()
    return out


def setup_ddp(device):
    """Returns (ddp, rank, world_size, device). Under torchrun: gloo on CPU, nccl on CUDA."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if not ddp:
        return False, 0, 1, device
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return True, rank, world, device


def start_run(cfg, argv):
    """Parse the config, join the process group, print the config and make out_dir (rank 0), seed.
    Returns (cfg, ddp, rank, world_size, device)."""
    cfg = configure(cfg, sys.argv[1:] if argv is None else argv)
    ddp, rank, world, device = setup_ddp(cfg.device)
    if rank == 0:
        print(json.dumps(asdict(cfg), indent=1))
        os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    return cfg, ddp, rank, world, device


def all_reduce_sum(x, ddp):
    if ddp:
        import torch.distributed as dist
        dist.all_reduce(x)
    return x


class JsonlLog:
    """Appends one JSON object per line to out_dir/metrics.jsonl (rank 0 only)."""

    def __init__(self, path, enabled):
        self.path, self.enabled = path, enabled

    def __call__(self, **kv):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(kv) + "\n")


def save_checkpoint(model, optimizer, step, cfg, extra_meta=None):
    """Model + optimizer + RNG state, written atomically through GPT.save."""
    raw = unwrap(model)
    state = dict(optimizer=optimizer.state_dict(), step=step, torch_rng=torch.get_rng_state())
    meta = dict(step=step, train_config=asdict(cfg), **(extra_meta or {}))
    raw.save(cfg.out_dir, meta=meta, files={"train_state.pt": state})


def load_train_state(path):
    f = os.path.join(path, "train_state.pt")
    if not os.path.exists(f):
        raise SystemExit(f"error: {path} has no train_state.pt to resume from")
    return torch.load(f, weights_only=False)


def lr_at(it, cfg):
    """Linear warmup, then cosine decay to min_lr at max_iters."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    r = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * r)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model, cfg):
    """AdamW; weight decay on matrices only. Embedding-only: just the embedding tables, no decay
    (decay would shrink the frozen rows), with gradients masked to the backtrack row."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.embedding_only:
        groups = [dict(params=params, weight_decay=0.0)]
    else:
        groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
                  dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             foreach=not cfg.device.startswith("cpu") or None)


def freeze_all_but_bk(model, bk_id):
    """Embedding-only training: everything frozen except the backtrack token's input/output rows."""
    raw = unwrap(model)
    for p in raw.parameters():
        p.requires_grad_(False)
    tables = {id(raw.transformer.wte.weight): raw.transformer.wte.weight, id(raw.lm_head.weight): raw.lm_head.weight}
    for W in tables.values():
        W.requires_grad_(True)
        keep = torch.zeros(W.shape[0], 1, device=W.device, dtype=W.dtype)
        keep[bk_id] = 1.0
        W.register_hook(lambda g, keep=keep: g * keep)


def restore(optimizer, cfg, resuming, master):
    """When resuming, load the optimizer and RNG state saved with out_dir's checkpoint.
    Returns the step to start from."""
    if not resuming:
        return 0
    st = load_train_state(cfg.out_dir)
    optimizer.load_state_dict(st["optimizer"])
    torch.set_rng_state(st["torch_rng"])
    if master:
        print(f"resuming from {cfg.out_dir} at step {st['step']}")
    return st["step"]


def wrap(model, cfg, ddp):
    """torch.compile and DDP around the model; the unwrapped model is what gets saved."""
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model)
    return model


def end_step(done, cfg, master, ddp, save, evaluate):
    """After an optimizer step: save and evaluate on schedule (rank 0), keep ranks together.
    Returns True when the run stops here (stop_at, as if interrupted)."""
    stopping = done == cfg.stop_at
    if master and (done % cfg.save_interval == 0 or done == cfg.max_iters or stopping):
        save()
    if master and cfg.eval_interval > 0 and (done % cfg.eval_interval == 0 or done == cfg.max_iters):
        evaluate(done)
    if ddp:
        import torch.distributed as dist
        dist.barrier()
    return stopping


def finish(raw, cfg, ddp, world, log, master, steps, t0):
    """End a run. Under DDP every rank must hold the same weights: exact hashes are compared and logged."""
    if ddp:
        import torch.distributed as dist
        hashes = [None] * world
        dist.all_gather_object(hashes, weights_hash(raw))
        log(step=cfg.max_iters, rank_weight_hashes=hashes)
        if master and len(set(hashes)) != 1:
            print(f"warning: ranks hold different weights: {hashes}", file=sys.stderr)
        dist.destroy_process_group()
    if master:
        print(f"done: {steps} steps in {time.time() - t0:.1f}s; checkpoint in {cfg.out_dir}")


def weights_hash(model):
    h = hashlib.sha256()
    for p in unwrap(model).state_dict().values():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]

# -----------------------------------------------------------------------------
# model setup


def build_model(cfg, tok, device):
    """Returns (model, meta) for cfg.init_from; the tokenizer must match the checkpoint."""
    if cfg.init_from == "scratch":
        mc = GPTConfig(block_size=cfg.block_size, vocab_size=padded_vocab(tok.n_vocab), n_layer=cfg.n_layer,
                       n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, tokenizer=cfg.tokenizer,
                       n_vocab=tok.n_vocab, eot_id=tok.eot_id, bk_id=tok.bk_id)
        return GPT(mc), {}
    path = cfg.out_dir if cfg.init_from == "resume" else cfg.init_from
    model = GPT.from_pretrained(path)
    c = model.config
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
        c.dropout = cfg.dropout
        for mod in model.modules():
            if hasattr(mod, "dropout"):
                mod.dropout = cfg.dropout
    return model.train(), getattr(model, "meta", {})

# -----------------------------------------------------------------------------
# data


def load_traces_file(path):
    """JSONL lines {"prompt": [ids], "response": [ids]}; errors name the file and line."""
    try:
        rows = read_jsonl(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    out = []
    for i, d in rows:
        try:
            out.append(Trace([int(x) for x in d["prompt"]], [int(x) for x in d["response"]]))
        except (KeyError, TypeError, ValueError) as e:
            raise SystemExit(f"error: {path}:{i}: not a trace line ({e!r})")
    if not out:
        raise SystemExit(f"error: {path} holds no traces")
    return out


def global_batch(step, cfg, tok, task, pool, extra, max_bk, size):
    """The traces of one global batch: a pure function of (seed, step)."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    n_extra = int(round(size * cfg.traces_ratio)) if extra else 0
    probs = [pool[rng.randrange(len(pool))] for _ in range(size - n_extra)]
    traces = build_traces(tok, task, probs, rng, backtrack_ratio=cfg.backtrack_ratio, max_backtracks=max_bk,
                          augment=cfg.augment)
    traces += [extra[rng.randrange(len(extra))] for _ in range(n_extra)]
    return traces


def micro_batches(traces, cfg, tok, rank, world, max_bk, device):
    """This rank's micro-batches: the global batch is split rank-major, then into grad_accum parts."""
    per_rank = len(traces) // world
    mine = traces[rank * per_rank:(rank + 1) * per_rank]
    per_micro = per_rank // cfg.grad_accum
    out = []
    for a in range(cfg.grad_accum):
        lays = [layout(t, tok.bk_id, cfg.policy, mask_errors=cfg.mask_errors)
                for t in mine[a * per_micro:(a + 1) * per_micro]]
        for L in lays:
            for t, w, b in zip(L["tgt"], L["weight"], L["bans"]):
                if w > 0 and t in b:   # log-prob -inf: the loss would be inf
                    raise SystemExit(f"error: a training trace takes action {t}, which the `{cfg.policy}` policy bans "
                                     "at that point (e.g. rewriting a token just deleted at the same slot); fix the data")
            if len(L["ids"]) > cfg.block_size:
                raise SystemExit(f"error: a trace of {len(L['ids'])} tokens exceeds block_size={cfg.block_size}; "
                                 "raise --block_size or shorten the task")
        if cfg.pack_rows:
            lays = pack(lays, cfg.block_size)
        out.append(collate(lays, device=device))
    return out

# -----------------------------------------------------------------------------


def main(argv=None):
    cfg, ddp, rank, world, device = start_run(Config(), argv)
    master = rank == 0
    tok = get_tokenizer(cfg.tokenizer)
    task_kwargs = parse_kwargs(cfg.task_kwargs)
    task = get_task(cfg.task, **task_kwargs)
    model, _ = build_model(cfg, tok, device)
    model.to(device)
    if cfg.embedding_only:
        freeze_all_but_bk(model, tok.bk_id)
    optimizer = make_optimizer(model, cfg)
    start = restore(optimizer, cfg, cfg.init_from == "resume", master)
    raw = model
    model = wrap(model, cfg, ddp)
    global_size = cfg.batch_size * cfg.grad_accum * world
    pool = task.problems("train", n=cfg.n_train, seed=cfg.seed)
    held_out = task.problems("test", n=cfg.eval_n, seed=cfg.seed + 1)
    extra = load_traces_file(cfg.traces_file) if cfg.traces_file else None
    curriculum = Curriculum.from_string(cfg.curriculum)
    log = JsonlLog(os.path.join(cfg.out_dir, "metrics.jsonl"), master)
    meta = dict(task=cfg.task, task_kwargs=task_kwargs, policy=cfg.policy, max_new_tokens=cfg.max_new_tokens, stage="sft")
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    if master:
        print(f"model: {raw.num_params() / 1e6:.2f}M parameters | global batch {global_size} traces | "
              f"policy={cfg.policy} mask_errors={cfg.mask_errors} | world {world}")

    def run_eval(step):
        from evaluate import held_out_eval
        res = held_out_eval(raw, tok, task, held_out, cfg.policy, cfg.eval_temperature, cfg.max_new_tokens, cfg.seed)
        log(step=step, **res)
        tqdm.write(f"step {step}: acc greedy {res['eval/greedy/acc']:.3f} | T={cfg.eval_temperature} "
                   f"{res['eval/t1/acc']:.3f} | bk/sample {res['eval/t1/bk_per_sample']:.2f}")
        return res

    bar = tqdm(range(start, cfg.max_iters), disable=not (master and cfg.progress), desc="sft", dynamic_ncols=True)
    t0, tokens, done = time.time(), 0, start
    for step in bar:
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        max_bk = curriculum.max_backtracks(step / cfg.max_iters)
        traces = global_batch(step, cfg, tok, task, pool, extra, max_bk, global_size)
        micros = micro_batches(traces, cfg, tok, rank, world, max_bk, device)
        # one normaliser for the whole global batch: accumulation and DDP then equal one big batch
        wsum = all_reduce_sum(sum(b["weight"].sum() for b in micros).detach().clone(), ddp)
        loss_sum = torch.zeros((), device=device)
        for a, batch in enumerate(micros):
            sync = not ddp or a == len(micros) - 1
            ctx = model.no_sync() if (ddp and not sync) else contextlib.nullcontext()
            with ctx, autocast:
                loss = sft_loss(model, batch, normalizer=wsum / world)
            loss.backward()
            loss_sum += loss.detach() / world
            tokens += batch["n_tokens"]
        loss_sum = all_reduce_sum(loss_sum, ddp)
        if not torch.isfinite(loss_sum):
            msg = f"error: loss is {loss_sum.item()} at step {step}; stopping. The last good checkpoint in {cfg.out_dir} is untouched."
            if master:
                print(msg, file=sys.stderr)
            raise SystemExit(msg)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if master and (step % cfg.log_interval == 0 or done == cfg.max_iters):
            dt = time.time() - t0
            log(step=step, loss=loss_sum.item(), lr=lr, max_backtracks=max_bk, tokens_per_s=tokens * world / max(dt, 1e-9))
            bar.set_postfix(loss=f"{loss_sum.item():.4f}", tok_s=f"{tokens * world / max(dt, 1e-9):.0f}")
        if end_step(done, cfg, master, ddp, lambda: save_checkpoint(model, optimizer, done, cfg, meta), run_eval):
            break
    finish(raw, cfg, ddp, world, log, master, done - start, t0)



if __name__ == "__main__":
    main()
