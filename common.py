"""
What every script shares: one config system (a dataclass with --key=value overrides), processes
(DDP under torchrun), checkpoints with exact resume, JSONL logs, loading a checkpoint with its
tokenizer, the held-out evaluation, and one clean way to fail on bad input.

Stage scripts (train_sft.py, train_grpo.py, train_dpo.py, self_errors.py, ...) import this and the
library modules (hf, tokenizer, tasks, data, model, decode, reward), never each other.
"""
import ast
import contextlib
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

from data import AUGMENTS, as_rule, count_backtracks
from hf import copy_tokenizer_files, declared_eos_ids, has_tokenizer_files, padded_vocab, read_json
from decode import generate, greedy_decodable
from model import GPT, GPTConfig, add_lora, init_bk_embedding, lora_modules, unwrap
from reward import deletion_stats
from tasks import prompt_ids, task_class
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
                try:
                    exec(open(arg).read(), {}, scope)
                except Exception as e:
                    raise SystemExit(f"error: config file {arg}: {type(e).__name__}: {e}")
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
            lit = ast.literal_eval(v)
            # a string field keeps its text ('0.35,0.5' is no tuple), unless the text is a quoted string
            v = lit if not isinstance(getattr(cfg, k, None), str) or isinstance(lit, str) else v
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


# fields that a resume never takes from the saved run: how this invocation starts and stops
NOT_RESTORED = ("init_from", "stop_at")


def start_run(cfg, argv, check=None):
    """Parse and check the config, restore a resumed run's saved config, join the process group,
    print the config and make out_dir (rank 0), seed, and catch SIGINT/SIGTERM so that the run
    saves at the end of the current step. check(cfg, world_size): a stage's own argument rules, run
    with the shared ones before anything is written. Returns (cfg, ddp, rank, world_size, device).

    --init_from=resume alone continues a run exactly: every setting comes from the checkpoint's
    saved config, except those given on this command line, which win (and are named)."""
    given = configure(cfg, sys.argv[1:] if argv is None else argv)
    if cfg.init_from == "resume":
        path = os.path.join(cfg.out_dir, "config.json")
        if not os.path.isfile(path) or not os.path.isfile(os.path.join(cfg.out_dir, "train_state.pt")):
            raise SystemExit(f"error: nothing to resume in --out_dir={cfg.out_dir}: no checkpoint of a run there")
        saved = read_json(path).get("train_config", {})
        names = {f.name for f in fields(cfg)}
        for k, v in saved.items():
            if k in names and k not in given and k not in NOT_RESTORED:
                setattr(cfg, k, tuple(v) if isinstance(getattr(cfg, k), tuple) else v)
        changed = {k: getattr(cfg, k) for k in given if k in saved and saved[k] != getattr(cfg, k)
                   and k not in NOT_RESTORED}
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"resuming the run in {cfg.out_dir} with its saved config"
                  + (f"; overridden on this command line: {changed}" if changed else ""))
    check_config(cfg)
    if check is not None:   # the stage's own rules
        check(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    if cfg.init_from not in ("scratch", "resume") and not os.path.isfile(os.path.join(cfg.init_from, "config.json")):
        raise SystemExit(f"error: --init_from={cfg.init_from}: no checkpoint there (no config.json); expected "
                         "scratch, resume or a checkpoint folder (train one first: python train_sft.py)")
    has = read_json(os.path.join(cfg.init_from, "config.json")).get("config", {}).get("lora_rank", 0) \
        if cfg.init_from not in ("scratch", "resume") else 0
    if getattr(cfg, "lora_rank", 0) > 0 and has and has != cfg.lora_rank:
        raise SystemExit(f"error: --lora_rank={cfg.lora_rank}: the starting checkpoint has rank-{has} adapters, "
                         "which this stage trains on (leave --lora_rank out)")
    if cfg.init_from != "resume" and os.path.isfile(os.path.join(cfg.out_dir, "train_state.pt")):
        raise SystemExit(f"error: --out_dir={cfg.out_dir} already holds a run's checkpoint: continue it with "
                         "--init_from=resume, or choose another --out_dir")
    ddp, rank, world, device = setup_ddp(cfg.device)
    if rank == 0:
        print(json.dumps(asdict(cfg), indent=1))
        os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    STOP["signal"] = None
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _request_stop)
    return cfg, ddp, rank, world, device


def check_config(cfg):
    """Reject settings that cannot work, before any work is done: one line naming the argument.
    Checks each field a stage has by its name, so every stage shares one set of rules."""
    def need(ok, k, what):
        if hasattr(cfg, k) and not ok(getattr(cfg, k)):
            raise SystemExit(f"error: --{k}={getattr(cfg, k)}: {what}")
    for k in ("batch_size", "grad_accum", "max_iters", "prompts_per_step", "micro_batch", "n_train", "n_layer",
              "n_head", "n_embd", "block_size", "log_interval", "save_interval", "num_iterations", "eval_n"):
        need(lambda v: v >= 1, k, "must be at least 1")
    for k in ("eval_interval", "warmup_iters", "lr", "min_lr", "weight_decay", "grad_clip", "beta", "stop_at",
              "max_tokens", "evals", "sft_weight", "temperature", "eval_temperature", "top_k", "max_new_tokens"):
        need(lambda v: v >= 0, k, "must be >= 0")
    need(lambda v: v in AUGMENTS + ("mixed",), "augment", f"expected one of {', '.join(AUGMENTS)} or mixed")
    if getattr(cfg, "augment", "") == "dfs" and not hasattr(task_class(cfg.task), "search_trace"):
        raise SystemExit(f"error: --augment=dfs: task {cfg.task!r} has no depth-first solver; sudoku has one")
    for k in ("backtrack_ratio", "traces_ratio", "dropout", "retry_rate"):
        need(lambda v: 0 <= v <= 1, k, "must be between 0 and 1")
    need(lambda v: 0 < v <= 1, "top_p", "must be in (0, 1]")
    need(lambda v: v >= 2, "group_size", "must be at least 2: advantages are relative to the group")
    need(lambda v: v in ("keep", "rewind") or (v == "" and not hasattr(cfg, "mask_errors")), "policy",
         "expected keep or rewind")
    need(lambda v: v in ("float32", "bfloat16"), "dtype", "expected float32 or bfloat16")
    if getattr(cfg, "fsdp", False) and getattr(cfg, "embedding_only", False):
        raise SystemExit("error: --fsdp=True with --embedding_only=True: training one embedding row needs no sharding; "
                         "use DDP (leave --fsdp out)")
    need(lambda v: v >= 0, "lora_rank", "must be >= 0 (0 = no adapters)")
    need(lambda v: v > 0, "lora_alpha", "must be > 0")
    need(lambda v: all(t.strip() in ("attn", "mlp") for t in v.split(",")) and v.strip(), "lora_targets",
         "expected attn, mlp or attn,mlp")
    if getattr(cfg, "lora_rank", 0) > 0 and getattr(cfg, "embedding_only", False):
        raise SystemExit("error: --lora_rank with --embedding_only=True: LoRA trains the BK rows with its adapters "
                         "already (--lora_bk=True, the default); leave --embedding_only out")
    if getattr(cfg, "fsdp", False) and getattr(cfg, "lora_rank", 0) > 0 and getattr(cfg, "lora_bk", False):
        raise SystemExit("error: --fsdp=True with --lora_bk=True: the BK rows' masked gradient needs whole tables; "
                         "use DDP, or --lora_bk=False")
    need(lambda v: isinstance(v, bool) or v in ("", "on", "off"), "slot_bans", "expected on or off")
    need(lambda v: (isinstance(v, int) and v >= -1) or str(v) in ("", "none") or str(v).isdigit(), "max_retries",
         "expected a number of retries, or none")
    if hasattr(cfg, "traces_file") and bool(cfg.traces_file) != (cfg.traces_ratio > 0):
        raise SystemExit("error: --traces_file and --traces_ratio go together: a traces file needs "
                         "--traces_ratio > 0 (the share of each batch drawn from it), and the ratio needs the file")
    if getattr(cfg, "traces_file", "") and not os.path.isfile(cfg.traces_file):
        raise SystemExit(f"error: --traces_file={cfg.traces_file}: no such file")


STOP = {"signal": None}   # set by the first SIGINT/SIGTERM; the training loop saves and stops after its step


def _request_stop(signum, frame):
    if STOP["signal"] is not None:   # a second Ctrl-C: stop now, without saving
        raise KeyboardInterrupt
    STOP["signal"] = signum
    print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to abort)", file=sys.stderr)


def all_reduce_sum(x, ddp):
    """Sum x over processes, in place (returns it). nccl reduces only CUDA tensors, so a CPU tensor
    makes the trip through the GPU."""
    if ddp:
        import torch.distributed as dist
        if dist.get_backend() == "nccl" and not x.is_cuda:
            x.copy_(all_reduce_sum(x.cuda(), ddp).cpu())
        else:
            dist.all_reduce(x)
    return x


def reduce_dict(d, ddp):
    """Named sums over processes: {name: float}, summed key by key in one all-reduce."""
    keys = list(d)
    t = all_reduce_sum(torch.tensor([float(d[k]) for k in keys], dtype=torch.float64), ddp)
    return dict(zip(keys, t.tolist()))


class JsonlLog:
    """Appends one JSON object per line to out_dir/metrics.jsonl (rank 0 only). A resumed run first
    cuts the file back to the lines it had when its checkpoint was saved, so the steps it replays
    are logged once."""

    def __init__(self, path, enabled, keep_lines=None):
        self.path, self.enabled = path, enabled
        if enabled and keep_lines is not None and os.path.exists(path):
            with open(path) as f:
                lines = f.readlines()[:keep_lines]
            with open(path, "w") as f:
                f.writelines(lines)

    def lines(self):
        if not os.path.exists(self.path):
            return 0
        with open(self.path) as f:
            return sum(1 for _ in f)

    def __call__(self, **kv):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(kv) + "\n")


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


def tokenizer_path(tokenizer, ckpt):
    """Where a checkpoint's recorded tokenizer is: 'byte', 'gpt2', a folder relative to the checkpoint
    (its own copy: ".", see save_checkpoint), or, as older checkpoints recorded it, any other path."""
    if tokenizer in ("byte", "gpt2") or os.path.isabs(tokenizer):
        return tokenizer
    inside = os.path.normpath(os.path.join(ckpt, tokenizer))
    return os.path.abspath(inside) if has_tokenizer_files(inside) else tokenizer


def sharded(model):
    """True for a model wrapped by FSDP2 (torch's fully_shard): its parameters are shards."""
    return hasattr(model, "unshard") and hasattr(model, "reshard")


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
    """AdamW over the trainable parameters only; weight decay on matrices only. Embedding tables whose
    gradients are masked to the backtrack row (embedding-only, LoRA with its BK rows) get no decay:
    it would shrink the frozen rows."""
    params = [p for p in model.parameters() if p.requires_grad]
    masked = {id(model.transformer.wte.weight), id(model.lm_head.weight)} if bk_rows_only(model, cfg) else set()
    groups = [dict(params=[p for p in params if p.dim() >= 2 and id(p) not in masked], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2 or id(p) in masked], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             foreach=not cfg.device.startswith("cpu") or None)


def bk_rows_only(model, cfg):
    """Whether the embedding tables train only in the backtrack token's rows (choose_trainable)."""
    return cfg.embedding_only or (bool(lora_modules(unwrap(model))) and cfg.lora_bk)


def choose_trainable(model, cfg, bk_id):
    """Which parameters a stage trains, by its flags: all of them (the default); only the backtrack
    token's input/output rows (--embedding_only); or LoRA adapters (--lora_rank, or the adapters
    the starting checkpoint already has), with the BK rows too when --lora_bk (the token is new to
    a Hugging Face model, and no adapter reaches its embedding). Everything else is frozen, so it
    has no gradient and no optimizer state."""
    raw = unwrap(model)
    if not lora_modules(raw) and cfg.lora_rank > 0:   # a rank that differs from the checkpoint's: start_run refused it
        add_lora(raw, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    if cfg.embedding_only or lora_modules(raw):
        for p in raw.parameters():
            p.requires_grad_(False)
        for _, lora in lora_modules(raw):
            lora.requires_grad_(True)
        if bk_rows_only(raw, cfg):
            tables = {id(raw.transformer.wte.weight): raw.transformer.wte.weight, id(raw.lm_head.weight): raw.lm_head.weight}
            for W in tables.values():
                W.requires_grad_(True)
                keep = torch.zeros(W.shape[0], 1, device=W.device, dtype=W.dtype)
                keep[bk_id] = 1.0
                W.register_hook(lambda g, keep=keep: g * keep)
    if raw.verifier is not None:   # the verifier head trains only in a stage that gives it a loss (SFT's --verifier_weight)
        raw.verifier.requires_grad_(getattr(cfg, "verifier_weight", 0.0) > 0)


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


def wrap(model, cfg, ddp):
    """Under torchrun: DDP (a full copy per process), or with --fsdp=True FSDP2 (torch's fully_shard:
    each block, then the rest, so a process holds 1/world of the weights, gradients and optimizer
    state, for models that do not fit one device). Then torch.compile. The optimizer is made after
    this: fully_shard replaces the parameters with shards. unwrap() gives the model to save."""
    if ddp and getattr(cfg, "fsdp", False):
        from torch.distributed.fsdp import fully_shard
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    elif ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model)
    if cfg.compile:
        model = torch.compile(model)
    return model


@contextlib.contextmanager
def grad_sync(model, ddp, on):
    """Gradient accumulation: the cross-process gradient reduction runs on the last micro-batch only."""
    raw = getattr(model, "_orig_mod", model)
    if not ddp or on:
        yield
    elif sharded(raw):
        raw.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            raw.set_requires_gradient_sync(True)
    else:
        with raw.no_sync():
            yield


def end_step(done, cfg, master, ddp, save, evaluate):
    """After an optimizer step: evaluate, then save, on schedule (rank 0), keep ranks together.
    Returns True when the run stops here: stop_at, or a SIGINT/SIGTERM on any rank (then it saves)."""
    stop = torch.tensor([float(done == cfg.stop_at or STOP["signal"] is not None)])
    stopping = bool(all_reduce_sum(stop, ddp).item() > 0)   # every rank stops at the same step
    # under FSDP every rank takes part (each forward gathers the shards); otherwise rank 0 alone
    everyone = master or getattr(cfg, "fsdp", False)
    if everyone and cfg.eval_interval > 0 and (done % cfg.eval_interval == 0 or done == cfg.max_iters):
        evaluate(done)
    if everyone and (done % cfg.save_interval == 0 or done == cfg.max_iters or stopping):
        save()
    if ddp:
        import torch.distributed as dist
        dist.barrier()
    return stopping


def progress_bar(cfg, start, master, desc):
    """The steps still to run, as a tqdm bar that counts from the step a resumed run starts at."""
    return tqdm(range(start, cfg.max_iters), initial=start, total=cfg.max_iters, desc=desc,
                disable=not (master and cfg.progress), dynamic_ncols=True)


def finish(raw, cfg, ddp, world, log, master, done, start, t0, script, then=""):
    """End a run: say where the checkpoint went and what to run next (or, when the run stopped early,
    how to continue it). Under DDP every rank must hold the same weights: exact hashes are compared
    and logged. A run stopped by SIGINT/SIGTERM exits with status 128 + the signal's number."""
    if ddp and sharded(raw):   # each rank holds its own shard by design
        import torch.distributed as dist
        dist.destroy_process_group()
    elif ddp:
        import torch.distributed as dist
        hashes = gather_hashes(raw, world)
        log(step=cfg.max_iters, rank_weight_hashes=hashes)
        if master and len(set(hashes)) != 1:
            print(f"warning: ranks hold different weights: {hashes}", file=sys.stderr)
        dist.destroy_process_group()
    if master and done < cfg.max_iters:
        print(f"stopped at step {done} of {cfg.max_iters}; checkpoint in {cfg.out_dir}. Continue with:\n"
              f"  python {script} --out_dir={cfg.out_dir} --init_from=resume")
    elif master:
        drawn = os.path.exists(os.path.join(cfg.out_dir, "curves.svg"))
        print(f"done: {done - start} steps in {time.time() - t0:.1f}s; checkpoint, metrics.jsonl"
              f"{' and its curves.svg' if drawn else ''} in {cfg.out_dir}"
              + (f". Next:\n  {then}" if then else ""))
    if STOP["signal"] is not None:
        sys.exit(128 + STOP["signal"])


def gather_hashes(model, world):
    """Every rank's weights_hash, by one all_gather: the last collective of a DDP run.
    Its tensors stay referenced here until the process group's worker thread has let go of them
    (their use count is back to ours). The worker may let go after the collective has returned
    here, and if that happens while the interpreter is shutting down, it needs the GIL to free
    tensors Python has dropped and aborts the process ("terminate called without an active
    exception": about one two-process CPU run in ten did so, after the run had finished and
    saved). The wait is bounded in case a backend keeps its references longer."""
    import torch.distributed as dist
    mine = torch.tensor(list(bytes.fromhex(weights_hash(model))), dtype=torch.uint8,
                        device=next(unwrap(model).parameters()).device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    deadline = time.time() + 10
    while any(t._use_count() > 1 for t in [mine, *every]) and time.time() < deadline:
        time.sleep(0.001)
    return [bytes(t.tolist()).hex() for t in every]


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
        c.dropout = cfg.dropout
        for mod in model.modules():
            if hasattr(mod, "dropout"):
                mod.dropout = cfg.dropout
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


def decoding_rule(cfg, meta):
    """The decoding rule (data.as_rule) a script after SFT samples and scores with: its own
    --policy / --slot_bans=on|off / --max_retries=N|none where given, else the checkpoint's, so
    that decoding applies the bans the model was trained under (docs/backtrack-semantics.md §4)."""
    if cfg.policy not in ("", "keep", "rewind") or cfg.slot_bans not in ("", "on", "off") or not (
            str(cfg.max_retries) in ("", "none") or str(cfg.max_retries).isdigit()):
        raise ValueError(f"--policy={cfg.policy} --slot_bans={cfg.slot_bans} --max_retries={cfg.max_retries}: expected "
                         "keep|rewind, on|off and a number or none (or leave them out: the checkpoint's)")
    mr = str(cfg.max_retries)
    return dict(policy=cfg.policy or meta.get("policy", "rewind"),
                slot_bans=meta.get("slot_bans", True) if cfg.slot_bans == "" else cfg.slot_bans == "on",
                max_retries=meta.get("max_retries") if mr == "" else None if mr == "none" else int(mr))


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
    model.config.dropout = 0.0
    for mod in model.modules():
        if hasattr(mod, "dropout"):
            mod.dropout = 0.0
    return model.train(), tok, model.meta

# -----------------------------------------------------------------------------
# held-out evaluation


@torch.no_grad()
def evaluate(model, tok, task, problems, rule="rewind", temperature=0.0, top_k=0, top_p=1.0,
             max_new_tokens=128, max_backtracks=None, batch_size=64, seed=0, progress=False, pop_below=0.0,
             trigger=0.0):
    """Generate one completion per problem under the decoding rule (data.as_rule), stopping at any of
    the tokenizer's stop ids, and score it on its resolved text with the task's verifier (acc) and
    its extra checks (task.scores: <name>_acc). Prompts come from tasks.prompt_ids (chat-rendered
    when tok.chat). pop_below: decode.generate's way out of a search; trigger: its verifier-triggered
    backtracks. Returns (metrics dict,
    per-sample records)."""
    was_training = model.training
    model.eval()
    records = []
    stops = set(tok.stop_ids)
    chunks = range(0, len(problems), batch_size)
    for i in tqdm(chunks, desc=f"eval T={temperature}", disable=not progress, leave=False):
        batch = problems[i:i + batch_size]
        prompts = [prompt_ids(tok, task, p) for p in batch]
        outs = generate(model, prompts, max_new_tokens=max_new_tokens, **as_rule(rule), temperature=temperature,
                        top_k=top_k, top_p=top_p, max_backtracks=max_backtracks, seed=seed + i, stop_ids=tok.stop_ids,
                        pop_below=pop_below, trigger=trigger)
        for p, o in zip(batch, outs):
            text = tok.decode([t for t in o["resolved"] if t not in stops])
            n_bk = count_backtracks(o["response"], tok.bk_id)
            reference = tok.encode(p["solution"]) + [tok.eot_id]
            necessary, unnecessary = deletion_stats(o["response"], reference, tok.bk_id)
            records.append(dict(question=p["question"], answer=p["answer"], response=o["response"],
                                text=text, parsed=task.answer_of(text), correct=bool(task.verify(text, p)),
                                scores=task.scores(text, p),
                                backtracks=n_bk, necessary=necessary, unnecessary=unnecessary,
                                finished=any(t in stops for t in o["resolved"]),
                                out_of_tokens=len(o["response"]) >= max_new_tokens and not any(t in stops for t in o["resolved"]),
                                longest_pop=longest_run(o["response"], tok.bk_id),
                                hit_cap=max_backtracks is not None and n_bk >= max_backtracks))
    model.train(was_training)
    return summarize(records), records


def longest_run(response, bk_id):
    """The longest run of consecutive BKs in a response: how far back its deepest pop went (in a
    depth-first search, a cascade through exhausted cells)."""
    best = run = 0
    for t in response:
        run = run + 1 if t == bk_id else 0
        best = max(best, run)
    return best


def summarize(records):
    """Metrics of a list of scored records (see evaluate)."""
    n = max(len(records), 1)
    deleted = sum(r["necessary"] + r["unnecessary"] for r in records)
    corrected = [r for r in records if r["backtracks"] > 0]
    extra = {f"{k}_acc": sum(bool(r.get("scores", {}).get(k)) for r in records) / n
             for k in (records[0].get("scores") or {} if records else {})}
    return dict(
        n=len(records),
        acc=sum(r["correct"] for r in records) / n,
        **extra,
        bk_per_sample=sum(r["backtracks"] for r in records) / n,
        share_backtracked=len(corrected) / n,
        precision=sum(r["necessary"] for r in records) / deleted if deleted else float("nan"),
        unnecessary_per_sample=sum(r["unnecessary"] for r in records) / n,
        corrections_right=sum(r["correct"] for r in corrected) / len(corrected) if corrected else float("nan"),
        hit_cap=sum(r["hit_cap"] for r in records) / n,
        finished=sum(r["finished"] for r in records) / n,
        # a search that did not end: out of generated tokens (the budget), or stalled before it
        # (every token banned at a slot, or, under `keep`, the context full)
        out_of_tokens=sum(r["out_of_tokens"] for r in records) / n,
        stalled=sum(not r["finished"] and not r["out_of_tokens"] for r in records) / n,
        longest_pop=sum(r["longest_pop"] for r in records) / n,   # mean of each sample's longest run of BKs
        mean_len=sum(len(r["response"]) for r in records) / n,
    )


def held_out_eval(model, tok, task, problems, rule, temperature, max_new_tokens, seed, max_backtracks=None):
    """Greedy and sampled (at `temperature`) metrics, flattened for a JSONL line: eval/greedy/*, eval/t1/*.
    Greedy (and a temperature of 0) is skipped where the rule leaves it undefined (greedy_decodable)."""
    res = {}
    passes = [("greedy", 0.0), ("t1", temperature)]
    for label, T in passes if greedy_decodable(**as_rule(rule)) else [p for p in passes if p[1] > 0]:
        m, _ = evaluate(model, tok, task, problems, rule, T, max_new_tokens=max_new_tokens,
                        max_backtracks=max_backtracks, seed=seed)
        res.update({f"eval/{label}/{k}": v for k, v in m.items() if k != "n"})
    return res


def eval_and_log(step, model, tok, task, problems, rule, cfg, log, max_new_tokens, max_backtracks=None):
    """The periodic evaluation of a training stage: held-out metrics logged at `step` and one line shown.
    Under FSDP every rank runs it in step (the same problems and seeds, so the same number of decoding
    steps), with the top-level weights gathered for decoding; the blocks gather their own."""
    if sharded(model):
        model.unshard()
    try:
        res = held_out_eval(model, tok, task, problems, rule, cfg.eval_temperature, max_new_tokens, cfg.seed,
                            max_backtracks=max_backtracks)
    finally:
        if sharded(model):
            model.reshard()
    log(step=step, **res)
    if int(os.environ.get("RANK", 0)) == 0:
        get = lambda k: res.get(k, float("nan"))   # nan: a pass the rule does not define (greedy_decodable)
        tqdm.write(f"step {step}: held-out acc greedy {get('eval/greedy/acc'):.3f} | T={cfg.eval_temperature} "
                   f"{get('eval/t1/acc'):.3f} | bk/sample greedy {get('eval/greedy/bk_per_sample'):.2f} "
                   f"T={cfg.eval_temperature} {get('eval/t1/bk_per_sample'):.2f}")
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
