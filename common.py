"""
What every script shares: one config system (a dataclass with --key=value overrides), processes
(DDP under torchrun), checkpoints with exact resume, JSONL logs, loading a checkpoint with its
tokenizer, the held-out evaluation, and one clean way to fail on bad input.

Stage scripts (train_sft.py, train_grpo.py, train_dpo.py, self_errors.py, ...) import this and the
library modules (model, data, tasks, tokenizer, reward), never each other.
"""
import ast
import hashlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, fields

import torch
from tqdm import tqdm

from data import count_backtracks
from hf import padded_vocab, read_json
from model import GPT, GPTConfig, generate, init_bk_embedding, unwrap
from reward import deletion_stats
from tasks import parse_answer
from tokenizer import get_tokenizer, hf_tokenizer_ids

# -----------------------------------------------------------------------------
# config, processes, logs, checkpoints


def configure(cfg, argv):
    """Apply optional config files (.json or .py) and --key=value overrides to a dataclass, in order.
    "--key value" works too, and a bare "--flag" sets a boolean to True. Values are parsed as Python
    literals where they parse, else kept as strings. Returns the keys set on the command line."""
    types = {f.name: f.type for f in fields(cfg)}
    given = []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise SystemExit(f"error: config file {arg!r} not found (arguments look like --key=value)")
            if arg.endswith(".json"):
                items = read_json(arg).items()
            else:
                scope = {}
                exec(open(arg).read(), {}, scope)
                items = [(k, v) for k, v in scope.items() if not k.startswith("_")]
            for k, v in items:
                _set(cfg, types, k, v, arg)
                given.append(k)
            continue
        if "=" in arg:
            k, v = arg[2:].split("=", 1)
        else:
            k = arg[2:]
            if isinstance(getattr(cfg, k, None), bool) and (i == len(argv) or argv[i].startswith("--")):
                v = "True"
            elif i < len(argv):
                v, i = argv[i], i + 1
            else:
                raise SystemExit(f"error: {arg} needs a value: {arg}=VALUE")
        try:
            v = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            pass
        _set(cfg, types, k, v, arg)
        given.append(k)
    return given


def _set(cfg, types, k, v, where):
    if k not in types:
        raise SystemExit(f"error: unknown config key {k!r} (from {where}); known: {', '.join(types)}")
    t = type(getattr(cfg, k))
    if t is bool and not isinstance(v, bool):
        raise SystemExit(f"error: {where}: {k} takes True or False, got {v!r}")
    if t is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if t is tuple and isinstance(v, list):
        v = tuple(v)
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
    configure(cfg, sys.argv[1:] if argv is None else argv)
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


def reduce_dict(d, ddp):
    """Named sums over processes: {name: float}, summed key by key in one all-reduce."""
    keys = list(d)
    t = all_reduce_sum(torch.tensor([float(d[k]) for k in keys], dtype=torch.float64), ddp)
    return dict(zip(keys, t.tolist()))


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
    model = GPT.from_pretrained(path, tok_ids=hf_tokenizer_ids(path))
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


def load_model(path, device="cpu", dtype=torch.float32):
    """A checkpoint folder (this project's, or a Hugging Face one) with its tokenizer: (model, tok).
    A Hugging Face folder's own tokenizer decides its end-of-text and BK ids, so the two agree."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no checkpoint at {path!r} (no config.json there)")
    model = GPT.from_pretrained(path, device=device, dtype=dtype, tok_ids=hf_tokenizer_ids(path))
    c = model.config
    tok = get_tokenizer(c.tokenizer)
    if (tok.bk_id, tok.eot_id) != (c.bk_id, c.eot_id):
        raise ValueError(f"tokenizer {c.tokenizer!r} does not match {path}/config.json "
                         f"(bk {tok.bk_id} vs {c.bk_id}, eot {tok.eot_id} vs {c.eot_id})")
    return model, tok


def load_policy(path, device, stage):
    """The starting model of a later stage (GRPO, DPO): a checkpoint of this project, which already
    knows the backtrack token, in train mode with dropout off (rollouts, references and the
    recomputed log-probs must see the same network). Returns (model, tok, meta)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"error: no checkpoint at {path!r}: train one first (python train_sft.py) "
                         "or pass --init_from=/path/to/checkpoint")
    model, tok = load_model(path, device)
    if model.meta.get("format") != "backtrack-gpt":
        raise SystemExit(f"error: {path} is not a checkpoint of this project (train_sft.py writes one); "
                         f"{stage} starts from a model that already knows the backtrack token")
    model.config.dropout = 0.0
    for mod in model.modules():
        if hasattr(mod, "dropout"):
            mod.dropout = 0.0
    return model.train(), tok, model.meta

# -----------------------------------------------------------------------------
# held-out evaluation


@torch.no_grad()
def evaluate(model, tok, task, problems, policy="rewind", temperature=0.0, top_k=0, top_p=1.0,
             max_new_tokens=128, max_backtracks=None, batch_size=64, seed=0, progress=False):
    """Generate one completion per problem and score it on its resolved text with the task's verifier.
    Returns (metrics dict, per-sample records)."""
    was_training = model.training
    model.eval()
    records = []
    chunks = range(0, len(problems), batch_size)
    for i in tqdm(chunks, desc=f"eval T={temperature}", disable=not progress, leave=False):
        batch = problems[i:i + batch_size]
        prompts = [tok.encode(task.prompt(p)) for p in batch]
        outs = generate(model, prompts, max_new_tokens=max_new_tokens, policy=policy, temperature=temperature,
                        top_k=top_k, top_p=top_p, max_backtracks=max_backtracks, seed=seed + i)
        for p, o in zip(batch, outs):
            text = tok.decode([t for t in o["resolved"] if t != tok.eot_id])
            n_bk = count_backtracks(o["response"], tok.bk_id)
            reference = tok.encode(p["solution"]) + [tok.eot_id]
            necessary, unnecessary = deletion_stats(o["response"], reference, tok.bk_id)
            records.append(dict(question=p["question"], answer=p["answer"], response=o["response"],
                                text=text, parsed=parse_answer(text), correct=bool(task.verify(text, p)),
                                backtracks=n_bk, necessary=necessary, unnecessary=unnecessary,
                                finished=tok.eot_id in o["resolved"],
                                hit_cap=max_backtracks is not None and n_bk >= max_backtracks))
    model.train(was_training)
    return summarize(records), records


def summarize(records):
    """Metrics of a list of scored records (see evaluate)."""
    n = max(len(records), 1)
    deleted = sum(r["necessary"] + r["unnecessary"] for r in records)
    corrected = [r for r in records if r["backtracks"] > 0]
    return dict(
        n=len(records),
        acc=sum(r["correct"] for r in records) / n,
        bk_per_sample=sum(r["backtracks"] for r in records) / n,
        share_backtracked=len(corrected) / n,
        precision=sum(r["necessary"] for r in records) / deleted if deleted else float("nan"),
        unnecessary_per_sample=sum(r["unnecessary"] for r in records) / n,
        corrections_right=sum(r["correct"] for r in corrected) / len(corrected) if corrected else float("nan"),
        hit_cap=sum(r["hit_cap"] for r in records) / n,
        finished=sum(r["finished"] for r in records) / n,
        mean_len=sum(len(r["response"]) for r in records) / n,
    )


def held_out_eval(model, tok, task, problems, policy, temperature, max_new_tokens, seed, max_backtracks=None):
    """Greedy and sampled (at `temperature`) metrics, flattened for a JSONL line: eval/greedy/*, eval/t1/*."""
    res = {}
    for label, T in (("greedy", 0.0), ("t1", temperature)):
        m, _ = evaluate(model, tok, task, problems, policy, T, max_new_tokens=max_new_tokens,
                        max_backtracks=max_backtracks, seed=seed)
        res.update({f"eval/{label}/{k}": v for k, v in m.items() if k != "n"})
    return res


def eval_and_log(step, model, tok, task, problems, policy, cfg, log, max_new_tokens, max_backtracks=None):
    """The periodic evaluation of a training stage: held-out metrics logged at `step` and one line shown."""
    res = held_out_eval(model, tok, task, problems, policy, cfg.eval_temperature, max_new_tokens, cfg.seed,
                        max_backtracks=max_backtracks)
    log(step=step, **res)
    tqdm.write(f"step {step}: held-out acc greedy {res['eval/greedy/acc']:.3f} | T={cfg.eval_temperature} "
               f"{res['eval/t1/acc']:.3f} | bk/sample greedy {res['eval/greedy/bk_per_sample']:.2f} "
               f"T={cfg.eval_temperature} {res['eval/t1/bk_per_sample']:.2f}")
    return res

# -----------------------------------------------------------------------------
# failing cleanly


def cli(main, quiet_pipe=False):
    """Run a script's main(). Bad input (a ValueError or a missing file, each naming the argument,
    file or line) ends in one line on stderr and exit status 2, with no traceback; set
    BACKTRACK_DEBUG=1 to see one. quiet_pipe: a reader that closes the pipe early (| head) ends
    the program silently, as it does any Unix tool."""
    if quiet_pipe:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        main()
    except (ValueError, OSError) as e:
        if os.environ.get("BACKTRACK_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
