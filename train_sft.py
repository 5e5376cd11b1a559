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

`--max_tokens=N` sets max_iters so that the run trains on about N tokens (backtrack traces are
longer than clean ones: equal-token comparisons such as ablate.py's use it).
"""
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

from augment import AUGMENTS, build_traces
from checkpoint import build_model, restore, save_checkpoint
from common import all_reduce_sum, cli, parse_kwargs, require, step_seed
from data import Prefetch, Rule, collate, layout, pack, read_traces
from heldout import eval_and_log
from model import add_verifier, sft_loss, sft_verifier_loss
from plot import write_run_curves
from schedules import Curriculum, lr_at
from tasks import get_task, task_class
from tokenizer import get_tokenizer
from training import (check_fsdp, choose_trainable, end_step, finish, grad_sync, make_optimizer, progress_bar,
                      start_run, stop_if_not_finite, wrap)


@dataclass
class Config:
    out_dir: str = "out/sft"
    init_from: str = "scratch"       # scratch | resume | path to a checkpoint folder (ours or Hugging Face)
    # task and data
    task: str = "arith"
    task_kwargs: str = ""            # e.g. "steps=3,digits=1" (passed to data.get_task)
    tokenizer: str = "byte"          # byte | gpt2 | path to a Hugging Face tokenizer folder
    chat: bool = True                # prompts through the tokenizer's chat template, when it has one
    policy: str = "rewind"           # rewind (errors leave the context) | keep (errors stay visible)
    slot_bans: bool = True           # rewind: a token deleted at a slot is banned there (docs §4; needed for greedy)
    max_retries: int = -1            # per-slot retry limit: BK is banned on a slot backtracked this often; -1 = none
    mask_errors: bool = True         # no loss on predicting an error token
    backtrack_ratio: float = 0.5     # share of traces that contain errors and backtracks
    augment: str = "plausible"       # plausible | random | lcs | mixed | retry | retry_weak | search | dfs (augment.build_traces)
    retry_rate: float = 0.5          # retry augmentations: chance of an undone false start before each line
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
    pos: str = "learned"             # learned | rope (rotary: positions past the training lengths still mean something)
    dropout: float = 0.0
    bk_init: str = "description"     # mean | semantic | description (for pretrained models)
    # optimisation
    batch_size: int = 32             # traces per micro-batch per process
    grad_accum: int = 1
    max_iters: int = 3000
    max_tokens: int = 0              # > 0: max_iters = about this many training tokens / tokens per step
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    embedding_only: bool = False     # train only the backtrack token's rows (research notes 5.4)
    lora_rank: int = 0                # > 0: train LoRA adapters of this rank on a frozen model; a checkpoint with adapters trains them
    lora_alpha: float = 16.0          # adapter scale alpha / rank
    lora_targets: str = "attn,mlp"    # the block linears adapted: attn (fused q/k/v and output), mlp, or both
    lora_bk: bool = True              # with adapters, also train the backtrack token's embedding rows
    verifier_weight: float = 0.0      # > 0: train a verifier head (is the last surviving token an error?) with this loss weight
    # evaluation and logging
    eval_interval: int = 500
    evals: int = 0                   # > 0: evaluate this many times, evenly (overrides eval_interval)
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
    fsdp: bool = False               # under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP
    progress: bool = True


# -----------------------------------------------------------------------------
# data


def global_batch(step, cfg, tok, task, pool, extra, max_bk, size):
    """The traces of one global batch: a pure function of (seed, step)."""
    rng = random.Random(step_seed(cfg.seed, step))
    n_extra = int(round(size * cfg.traces_ratio)) if extra else 0
    probs = [pool[rng.randrange(len(pool))] for _ in range(size - n_extra)]
    traces = build_traces(tok, task, probs, rng, backtrack_ratio=cfg.backtrack_ratio, max_backtracks=max_bk,
                          augment=cfg.augment, retry_rate=cfg.retry_rate, max_len=cfg.block_size)
    traces += [extra[rng.randrange(len(extra))] for _ in range(n_extra)]
    return traces


def micro_batches(traces, cfg, tok, rank, world, max_bk, device):
    """This rank's micro-batches: the global batch is split rank-major, then into grad_accum parts."""
    per_rank = len(traces) // world
    mine = traces[rank * per_rank:(rank + 1) * per_rank]
    per_micro = per_rank // cfg.grad_accum
    out = []
    for a in range(cfg.grad_accum):
        lays = [layout(t, tok.bk_id, sft_rule(cfg), mask_errors=cfg.mask_errors)
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


def step_data(step, cfg, tok, task, pool, extra, curriculum, rank, world, device):
    """What one step trains on: the curriculum's backtrack cap and this rank's micro-batches, a pure
    function of (seed, step), so the loop can have it built ahead (data.Prefetch)."""
    max_bk = curriculum.max_backtracks(step / cfg.max_iters)
    traces = global_batch(step, cfg, tok, task, pool, extra, max_bk, cfg.batch_size * cfg.grad_accum * world)
    return max_bk, micro_batches(traces, cfg, tok, rank, world, max_bk, device)


def sft_rule(cfg):
    """The decoding rule this run trains under; the checkpoint records it, so later stages,
    evaluation and generation decode under the same bans."""
    return Rule(cfg.policy, cfg.slot_bans, None if cfg.max_retries < 0 else cfg.max_retries)


def tokens_per_step(cfg, tok, task, pool, extra=None):
    """Mean training tokens (fed nodes) of one global batch of one process, measured on batches drawn
    early, midway and late in the curriculum."""
    cur = Curriculum.from_string(cfg.curriculum)
    n = []
    for step, progress in enumerate((0.1, 0.5, 0.9)):
        traces = global_batch(step, cfg, tok, task, pool, extra, cur.max_backtracks(progress),
                              cfg.batch_size * cfg.grad_accum)
        n.append(sum(b.n_tokens for b in micro_batches(traces, cfg, tok, 0, 1, 0, "cpu")))
    return sum(n) / len(n)

# -----------------------------------------------------------------------------


def check_args(cfg, world):
    """SFT's own argument rules (training.check_train_config has the shared ones)."""
    require(cfg, "batch_size grad_accum n_train n_layer n_head n_embd block_size", lambda v: v >= 1, "must be at least 1")
    require(cfg, "max_tokens evals max_new_tokens", lambda v: v >= 0, "must be >= 0")
    require(cfg, "backtrack_ratio traces_ratio dropout retry_rate", lambda v: 0 <= v <= 1, "must be between 0 and 1")
    require(cfg, "augment", lambda v: v in AUGMENTS + ("mixed",), f"expected one of {', '.join(AUGMENTS)} or mixed")
    if cfg.augment == "dfs" and not hasattr(task_class(cfg.task), "search_trace"):
        raise SystemExit(f"error: --augment=dfs: task {cfg.task!r} has no depth-first solver; sudoku has one")
    require(cfg, "policy", lambda v: v in ("keep", "rewind"), "expected keep or rewind")
    require(cfg, "max_retries", lambda v: v >= -1, "expected a number of retries, or -1 (none)")
    require(cfg, "dtype", lambda v: v in ("float32", "bfloat16"), "expected float32 or bfloat16")
    require(cfg, "verifier_weight", lambda v: v >= 0, "a loss weight is >= 0 (0 = no verifier head)")
    if bool(cfg.traces_file) != (cfg.traces_ratio > 0):
        raise SystemExit("error: --traces_file and --traces_ratio go together: a traces file needs "
                         "--traces_ratio > 0 (the share of each batch drawn from it), and the ratio needs the file")
    if cfg.traces_file and not os.path.isfile(cfg.traces_file):
        raise SystemExit(f"error: --traces_file={cfg.traces_file}: no such file")
    check_fsdp(cfg)


def sft_step(model, micros, cfg, ddp, world, device, autocast):
    """Forward and backward over one step's micro-batches; returns the step's LM loss and verifier
    loss (None without a head), summed over processes. One normaliser for the whole global batch:
    accumulation and DDP then equal one big batch."""
    wsum = all_reduce_sum(sum(b.weight.sum() for b in micros).detach().clone(), ddp)
    vsum = None   # the verifier's normaliser: its scored actions in the global batch
    if cfg.verifier_weight > 0:
        vsum = all_reduce_sum(sum((b.wrong >= 0).sum().float() for b in micros).clone(), ddp).clamp(min=1.0)
    loss_sum, vloss_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    for a, batch in enumerate(micros):
        with grad_sync(model, ddp, a == len(micros) - 1), autocast:
            if cfg.verifier_weight > 0:   # one forward feeds both heads
                lm, vloss = sft_verifier_loss(model, batch, wsum / world, vsum / world)
                vloss_sum += vloss.detach() / world
                loss = lm + cfg.verifier_weight * vloss
            else:
                lm = loss = sft_loss(model, batch, normalizer=wsum / world)
        loss.backward()
        loss_sum += lm.detach() / world   # the logged loss is the LM's alone, comparable with a run without the head
    return all_reduce_sum(loss_sum, ddp), all_reduce_sum(vloss_sum, ddp) if cfg.verifier_weight > 0 else None


def main(argv=None):
    cfg, ddp, rank, world, device = start_run(Config(), argv, check_args)
    master = rank == 0
    tok = get_tokenizer(cfg.tokenizer, chat=cfg.chat)
    cfg.chat = tok.chat   # saved with the run: what its prompts were, so later stages default to the same
    task_kwargs = parse_kwargs(cfg.task_kwargs)
    task = get_task(cfg.task, **task_kwargs)
    # every input is read before anything is built or written
    pool = task.problems("train", n=cfg.n_train, seed=cfg.seed)
    held_out = task.problems("test", n=cfg.eval_n, seed=cfg.seed + 1)
    extra = read_traces(cfg.traces_file, tok.n_vocab) if cfg.traces_file else None
    model, _ = build_model(cfg, tok, device)
    if cfg.init_from == "resume" and (model.verifier is not None) != (cfg.verifier_weight > 0):
        # the optimizer state of the run holds the head's moments, or does not: it resumes only as it was
        raise SystemExit(f"error: --verifier_weight={cfg.verifier_weight}: the run in {cfg.out_dir} was trained "
                         f"{'with' if model.verifier is not None else 'without'} a verifier head; resume it with "
                         f"{'a weight > 0' if model.verifier is not None else '--verifier_weight=0'}")
    if cfg.verifier_weight > 0:   # a checkpoint that has one (a resumed run) keeps its own
        add_verifier(model)
    model.to(device)
    choose_trainable(model, cfg, tok.bk_id, cfg.verifier_weight > 0)   # all, the BK rows (--embedding_only), or LoRA adapters (--lora_rank)
    raw = model
    model = wrap(model, cfg, ddp, cfg.fsdp)   # before the optimizer: FSDP replaces the parameters with shards
    optimizer = make_optimizer(raw, cfg)
    start, log = restore(raw, optimizer, cfg, cfg.init_from == "resume", master)
    global_size = cfg.batch_size * cfg.grad_accum * world
    if cfg.max_tokens > 0:   # equal-token budgets: longer traces get fewer steps
        cfg.max_iters = max(1, round(cfg.max_tokens / (tokens_per_step(cfg, tok, task, pool, extra) * world)))
    if cfg.evals > 0:
        cfg.eval_interval = max(1, cfg.max_iters // cfg.evals)
    if master and (cfg.max_tokens > 0 or cfg.evals > 0):
        print(f"max_iters={cfg.max_iters} eval_interval={cfg.eval_interval}")
    curriculum = Curriculum.from_string(cfg.curriculum)
    meta = dict(task=cfg.task, task_kwargs=task_kwargs, **asdict(sft_rule(cfg)), max_new_tokens=cfg.max_new_tokens, stage="sft")
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    if master:
        print(f"model: {raw.num_params() / 1e6:.2f}M parameters | global batch {global_size} traces | "
              f"policy={cfg.policy} mask_errors={cfg.mask_errors} | world {world}")

    run_eval = lambda step: eval_and_log(step, raw, tok, task, held_out, sft_rule(cfg), cfg, log, cfg.max_new_tokens)

    save = lambda step: save_checkpoint(model, optimizer, step, cfg, meta, log)
    if start == 0:   # every rank: under FSDP the save gathers the shards
        save(0)   # a run killed before its first periodic save can still be resumed
    bar = progress_bar(cfg, start, master, "sft")
    data = Prefetch(lambda step: step_data(step, cfg, tok, task, pool, extra, curriculum, rank, world, device),
                    range(start, cfg.max_iters))
    t0, tokens, done = time.time(), 0, start
    for step in bar:
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        max_bk, micros = next(data)   # built ahead of time by a background thread (data.Prefetch)
        loss_sum, vloss_sum = sft_step(model, micros, cfg, ddp, world, device, autocast)
        step_tokens = sum(b.n_tokens for b in micros)   # this rank's
        tokens += step_tokens
        stop_if_not_finite(loss_sum, step, cfg)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if master and (step % cfg.log_interval == 0 or done == cfg.max_iters):
            dt = time.time() - t0
            vlog = {} if vloss_sum is None else dict(verifier_loss=vloss_sum.item())   # (not `extra`: the traces)
            log(step=step, loss=loss_sum.item(), lr=lr, max_backtracks=max_bk, tokens_per_s=tokens * world / max(dt, 1e-9),
                elapsed_s=dt, tokens=step_tokens * world, **vlog)   # tokens: fed in this step (all ranks)
            bar.set_postfix(loss=f"{loss_sum.item():.4f}", tok_s=f"{tokens * world / max(dt, 1e-9):.0f}")
        if end_step(done, cfg, master, ddp, lambda: save(done), run_eval, cfg.fsdp):
            break
    data.close()
    if master:
        write_run_curves(cfg.out_dir)   # curves.svg beside metrics.jsonl
    finish(raw, cfg, ddp, world, log, master, done, start, t0, "train_sft.py",
           then=f"python train_grpo.py --init_from={cfg.out_dir}   or   python generate.py --ckpt={cfg.out_dir} --prompt ...")


if __name__ == "__main__":
    cli(main)
