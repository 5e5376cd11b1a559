"""
What every training stage (train_sft.py, train_grpo.py, train_dpo.py) shares around its own loop:
starting a run (config, resume, the process group, the stop signals), the argument rules all
trainers have, which parameters train and their optimizer, wrapping for DDP/FSDP2 and
torch.compile, gradient accumulation, the end of each step (evaluate, save, stop together), and
the end of the run.
"""
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, fields

import torch
from tqdm import tqdm

from common import STOP, all_reduce_sum, catch_stop_signals, configure, read_json, require, setup_ddp, sharded
from model import add_lora, lora_modules, unwrap

# -----------------------------------------------------------------------------
# starting a run


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
    check_train_config(cfg)
    if check is not None:   # the stage's own rules
        check(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    if cfg.init_from not in ("scratch", "resume") and not os.path.isfile(os.path.join(cfg.init_from, "config.json")):
        raise SystemExit(f"error: --init_from={cfg.init_from}: no checkpoint there (no config.json); expected "
                         "scratch, resume or a checkpoint folder (train one first: python train_sft.py)")
    has = read_json(os.path.join(cfg.init_from, "config.json")).get("config", {}).get("lora_rank", 0) \
        if cfg.init_from not in ("scratch", "resume") else 0
    if cfg.lora_rank > 0 and has and has != cfg.lora_rank:
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
    catch_stop_signals()
    return cfg, ddp, rank, world, device


def check_train_config(cfg):
    """The argument rules of the fields every trainer has (each stage's own check covers the rest)."""
    require(cfg, "max_iters log_interval save_interval eval_n", lambda v: v >= 1, "must be at least 1")
    require(cfg, "eval_interval warmup_iters lr min_lr weight_decay grad_clip stop_at eval_temperature",
            lambda v: v >= 0, "must be >= 0")
    require(cfg, "lora_rank", lambda v: v >= 0, "must be >= 0 (0 = no adapters)")
    require(cfg, "lora_alpha", lambda v: v > 0, "must be > 0")
    require(cfg, "lora_targets", lambda v: all(t.strip() in ("attn", "mlp") for t in v.split(",")) and v.strip(),
            "expected attn, mlp or attn,mlp")
    if cfg.lora_rank > 0 and cfg.embedding_only:
        raise SystemExit("error: --lora_rank with --embedding_only=True: LoRA trains the BK rows with its adapters "
                         "already (--lora_bk=True, the default); leave --embedding_only out")


def check_fsdp(cfg):
    """The rules of --fsdp, for the stages that can shard (SFT, DPO)."""
    if cfg.fsdp and cfg.embedding_only:
        raise SystemExit("error: --fsdp=True with --embedding_only=True: training one embedding row needs no sharding; "
                         "use DDP (leave --fsdp out)")
    if cfg.fsdp and cfg.lora_rank > 0 and cfg.lora_bk:
        raise SystemExit("error: --fsdp=True with --lora_bk=True: the BK rows' masked gradient needs whole tables; "
                         "use DDP, or --lora_bk=False")

# -----------------------------------------------------------------------------
# what trains, and how


def choose_trainable(model, cfg, bk_id, train_verifier=False):
    """Which parameters a stage trains, by its flags: all of them (the default); only the backtrack
    token's input/output rows (--embedding_only); or LoRA adapters (--lora_rank, or the adapters
    the starting checkpoint already has), with the BK rows too when --lora_bk (the token is new to
    a Hugging Face model, and no adapter reaches its embedding). Everything else is frozen, so it
    has no gradient and no optimizer state. train_verifier: whether a verifier head trains (only a
    stage that gives it a loss: SFT's --verifier_weight)."""
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
    if raw.verifier is not None:
        raw.verifier.requires_grad_(train_verifier)


def bk_rows_only(model, cfg):
    """Whether the embedding tables train only in the backtrack token's rows (choose_trainable)."""
    return cfg.embedding_only or (bool(lora_modules(unwrap(model))) and cfg.lora_bk)


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


def wrap(model, cfg, ddp, fsdp=False):
    """Under torchrun: DDP (a full copy per process), or with --fsdp=True FSDP2 (torch's fully_shard:
    each block, then the rest, so a process holds 1/world of the weights, gradients and optimizer
    state, for models that do not fit one device). Then torch.compile. The optimizer is made after
    this: fully_shard replaces the parameters with shards. unwrap() gives the model to save."""
    if ddp and fsdp:
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
    raw = getattr(model, "_orig_mod", model)   # the DDP or FSDP model under torch.compile (unwrap goes past DDP too)
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

# -----------------------------------------------------------------------------
# each step, and the end of the run


def stop_if_not_finite(loss, step, cfg):
    """A loss that is NaN or infinite ends the run before the step is saved (SFT and DPO check
    before their optimizer step, GRPO after its passes), so the last saved checkpoint stays the
    last good one. Every rank holds the same reduced loss, so all stop."""
    loss = float(loss)
    if not math.isfinite(loss):
        raise SystemExit(f"error: loss is {loss} at step {step}; stopping. The last good checkpoint in {cfg.out_dir} "
                         "is untouched.")


def end_step(done, cfg, master, ddp, save, evaluate, fsdp=False):
    """After an optimizer step: evaluate, then save, on schedule (rank 0), keep ranks together.
    Returns True when the run stops here: stop_at, or a SIGINT/SIGTERM on any rank (then it saves)."""
    stop = torch.tensor([float(done == cfg.stop_at or STOP["signal"] is not None)])
    stopping = bool(all_reduce_sum(stop, ddp).item() > 0)   # every rank stops at the same step
    # under FSDP every rank takes part (each forward gathers the shards); otherwise rank 0 alone
    everyone = master or fsdp
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
