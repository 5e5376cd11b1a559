"""
Token-level DPO on the model's own errors (research notes 5.3).

    python self_errors.py --ckpt=out/sft --n=500 --samples=4       # writes out/self_pairs.jsonl
    python train_dpo.py --init_from=out/sft --pairs_file=out/self_pairs.jsonl
    python train_dpo.py --loss_type=ipo --beta=0.5
    torchrun --standalone --nproc_per_node=2 train_dpo.py --batch_size=8

A pair shares the prompt and a response prefix (the correct start of a solution, then the tokens
where the model went wrong); the two completions differ:
    chosen   = BK per error token, then the correct continuation and end-of-text
    rejected = the model's own continuation of the error
Only the completions are scored: log pi(completion | prompt, prefix), summed over the completion's
actions under the checkpoint's context policy (data.layout, mask_errors=False), with weight 0 on
every action of the shared prefix. Under `rewind` a BK is an action like any other: its log-prob is
scored from the slot it deletes, and the correction that follows is scored with the error out of
the context and banned at its slot, exactly as the sampler would draw it.

Loss, with h = (log pi_c - log ref_c) - (log pi_r - log ref_r):
    sigmoid  -log sigmoid(beta * h)              (DPO)
    ipo      (h - 1 / (2 beta))^2                (IPO; summed log-probs, as in the IPO paper)
The reference is the initial checkpoint, frozen: its log-probs are computed once, before the first
step, and kept in out_dir/ref_logprobs.pt, so no second model sits in memory and resume is exact.
Logged like TRL: rewards/chosen = beta (log pi_c - log ref_c), rewards/rejected likewise,
rewards/margins = their difference, rewards/accuracies = share of pairs with a positive margin.
"""
import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from checkpoint import load_stage_model, restore, save_checkpoint
from common import all_reduce_sum, cli, parse_kwargs, read_jsonl, require, step_seed
from data import Rule, RuleFlags, Trace, completion_batch, layout
from heldout import eval_and_log
from model import completion_logprobs
from plot import write_run_curves
from schedules import lr_at
from tasks import checkpoint_task
from training import (check_fsdp, choose_trainable, end_step, finish, grad_sync, make_optimizer, progress_bar,
                      start_run, stop_if_not_finite, wrap)


@dataclass
class Config(RuleFlags):   # --policy, --slot_bans, --max_retries: the checkpoint's unless given (data.RuleFlags)
    out_dir: str = "out/dpo"
    init_from: str = "out/sft"        # a checkpoint of this project (the frozen reference too) | resume
    pairs_file: str = "out/self_pairs.jsonl"
    # task (default: the checkpoint's own task, settings and context policy)
    task: str = ""
    task_kwargs: str = ""
    chat: bool = True                # prompts in the checkpoint's chat template when it has one; False: plain
    # loss
    loss_type: str = "sigmoid"        # sigmoid (DPO) | ipo
    beta: float = 0.1
    sft_weight: float = 0.0           # + this * per-token NLL of the chosen completion (keeps its likelihood up)
    # optimisation
    batch_size: int = 16              # pairs per micro-batch per process (two rows each)
    grad_accum: int = 1
    max_iters: int = 200
    lr: float = 1e-5                  # 1e-4 collapsed the default 1.8M arith model into backtracking every line
    min_lr: float = 1e-6
    warmup_iters: int = 10
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    embedding_only: bool = False      # train only the backtrack token's rows (research notes 5.4)
    lora_rank: int = 0                # > 0: train LoRA adapters of this rank on a frozen model; a checkpoint with adapters trains them
    lora_alpha: float = 16.0          # adapter scale alpha / rank
    lora_targets: str = "attn,mlp"    # the block linears adapted: attn (fused q/k/v and output), mlp, or both
    lora_bk: bool = True              # with adapters, also train the backtrack token's embedding rows
    # evaluation and logging
    eval_interval: int = 100
    eval_at_start: bool = True        # evaluate the initial checkpoint too (the 'before' numbers)
    eval_n: int = 200
    eval_temperature: float = 1.0
    max_new_tokens: int = 0           # for evaluation; 0 = the checkpoint's
    log_interval: int = 10
    save_interval: int = 100
    stop_at: int = 0                  # stop (and save) after this many steps, as if interrupted
    # system
    seed: int = 1337
    device: str = "cpu"
    compile: bool = False
    fsdp: bool = False                # under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP
    progress: bool = True

# -----------------------------------------------------------------------------
# pairs: only the completions are scored (data.completion_batch, model.completion_logprobs)


def pair_batch(pairs, bk_id, rule, device="cpu"):
    """Chosen rows first, then rejected rows, each prompt + shared prefix + completion."""
    traces = [Trace(p["prompt"], p["prefix"] + p[k]) for k in ("chosen", "rejected") for p in pairs]
    starts = [len(p["prefix"]) for _ in ("chosen", "rejected") for p in pairs]
    return completion_batch(traces, starts, bk_id, rule, device=device)


def check_pairs(pairs, path, bk_id, rule):
    """A completion action the policy bans (e.g. under `rewind`, rewriting the token just deleted
    at that slot) has log-prob -inf: the pair could never be sampled and its loss is not finite."""
    for i, p in enumerate(pairs, 1):
        for k in ("chosen", "rejected"):
            L = layout(Trace(p["prompt"], p["prefix"] + p[k]), bk_id, rule, mask_errors=False)
            for a in range(len(p["prefix"]), len(L["tgt"])):
                if L["tgt"][a] in L["bans"][a]:
                    raise SystemExit(f"error: {path}: pair {i}: its {k} completion takes token {L['tgt'][a]}, which the "
                                     f"decoding rule {rule} bans at that point; the pair cannot be scored")


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, loss_type="sigmoid"):
    """Per-pair loss and implicit rewards. All inputs (N,) summed completion log-probs."""
    rc, rr = pi_c - ref_c, pi_r - ref_r
    h = rc - rr
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be sigmoid | ipo, not {loss_type!r}")
    return loss, beta * rc.detach(), beta * rr.detach()

# -----------------------------------------------------------------------------
# data


def load_pairs(path, block_size, n_vocab):
    """JSONL lines {"prompt", "prefix", "chosen", "rejected": [ids], "question": text (optional)};
    every id a token of the model's vocabulary; errors name the file and line."""
    if not os.path.exists(path):
        raise SystemExit(f"error: no pairs file at {path!r}: write one with "
                         "python self_errors.py --ckpt=<sft checkpoint>")
    try:
        rows = read_jsonl(path)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    out = []
    for i, d in rows:
        try:
            p = {k: [int(x) for x in d[k]] for k in ("prompt", "prefix", "chosen", "rejected")}
        except (KeyError, TypeError, ValueError) as e:
            raise SystemExit(f"error: {path}:{i}: not a pair line ({e!r})")
        bad = [x for k in ("prompt", "prefix", "chosen", "rejected") for x in p[k] if not 0 <= x < n_vocab]
        if bad:
            raise SystemExit(f"error: {path}:{i}: token id {bad[0]} is outside the model's vocabulary (0..{n_vocab - 1})")
        if not p["prompt"] or not p["chosen"] or not p["rejected"]:
            raise SystemExit(f"error: {path}:{i}: prompt, chosen and rejected must be non-empty")
        n = len(p["prompt"]) + len(p["prefix"]) + max(len(p["chosen"]), len(p["rejected"]))
        if n > block_size:
            raise SystemExit(f"error: {path}:{i}: a pair of {n} tokens exceeds block_size={block_size}")
        p["question"] = d.get("question")
        out.append(p)
    if not out:
        raise SystemExit(f"error: {path} holds no pairs")
    return out


def pairs_hash(pairs):
    h = hashlib.sha256(json.dumps([[p[k] for k in ("prompt", "prefix", "chosen", "rejected")] for p in pairs]).encode())
    return h.hexdigest()[:16]


def pair_indices(step, seed, n, size):
    """Indices of the global batch of a step: epochs of fresh permutations, a pure function of
    (seed, step), so resume and DDP are exact and each pair is seen once per epoch."""
    out = []
    for k in range(step * size, (step + 1) * size):
        epoch, j = divmod(k, n)
        perm = list(range(n))
        random.Random(step_seed(seed, epoch)).shuffle(perm)
        out.append(perm[j])
    return out


@torch.no_grad()
def reference_logprobs(model, pairs, bk_id, rule, batch_size, device):
    """(chosen, rejected) completion log-probs of every pair under `model`, frozen."""
    was_training = model.training
    model.eval()
    c, r = [], []
    for s in range(0, len(pairs), batch_size):
        part = pairs[s:s + batch_size]
        lp = completion_logprobs(model, pair_batch(part, bk_id, rule, device))
        c.append(lp[:len(part)]); r.append(lp[len(part):])
    model.train(was_training)
    return torch.cat(c), torch.cat(r)


def dpo_step(model, pairs, part_of, ref_c, ref_r, bk_id, rule, cfg, ddp, world, global_size, device):
    """Forward and backward over this rank's micro-batches (part_of(a): the pair indices of the
    a-th). Returns the step's means over the global batch: loss, rewards chosen/rejected, share
    correct, logps chosen/rejected."""
    stats = torch.zeros(6, dtype=torch.float64)   # sums over this rank's pairs
    for a in range(cfg.grad_accum):
        part = part_of(a)
        batch = pair_batch([pairs[i] for i in part], bk_id, rule, device)
        with grad_sync(model, ddp, a == cfg.grad_accum - 1):
            lp = completion_logprobs(model, batch)
            n = len(part)
            pi_c, pi_r = lp[:n], lp[n:]
            sel = torch.tensor(part, device=device)
            loss_vec, rc, rr = dpo_loss(pi_c, pi_r, ref_c[sel], ref_r[sel], cfg.beta, cfg.loss_type)
            if cfg.sft_weight > 0:
                n_tok = torch.tensor([len(pairs[i]["chosen"]) for i in part], device=device, dtype=lp.dtype)
                loss_vec = loss_vec - cfg.sft_weight * pi_c / n_tok
            # DDP averages gradients over processes: scale by world so the step follows the
            # mean over the global batch, whatever the split into processes and micro-batches
            loss = loss_vec.sum() / global_size * world
            loss.backward()
        stats += torch.tensor([loss_vec.sum().item(), rc.sum().item(), rr.sum().item(), (rc > rr).sum().item(),
                               pi_c.sum().item(), pi_r.sum().item()], dtype=torch.float64)
    return all_reduce_sum(stats.to(device), ddp).cpu() / global_size

# -----------------------------------------------------------------------------


def check_args(cfg, world):
    """DPO's own argument rules (training.check_train_config has the shared ones)."""
    require(cfg, "batch_size grad_accum", lambda v: v >= 1, "must be at least 1")
    require(cfg, "beta sft_weight max_new_tokens", lambda v: v >= 0, "must be >= 0")
    Rule.from_flags(cfg)   # the decoding-rule flags parse
    check_fsdp(cfg)


def main(argv=None):
    cfg, ddp, rank, world, device = start_run(Config(), argv, check_args)
    master = rank == 0
    resuming = cfg.init_from == "resume"
    model, tok, init_meta = load_stage_model(cfg.out_dir if resuming else cfg.init_from, device, "DPO", cfg.chat)
    cfg.chat = tok.chat   # saved with the run: what its evaluation prompts were
    ref_path = init_meta.get("dpo_reference", cfg.init_from) if resuming else cfg.init_from
    task_name, task_kwargs, task = checkpoint_task(init_meta, cfg.task,
                                                   parse_kwargs(cfg.task_kwargs) if cfg.task_kwargs else None)
    rule = Rule.from_flags(cfg, init_meta)
    max_new_tokens = cfg.max_new_tokens or init_meta.get("max_new_tokens", 128)
    pairs = load_pairs(cfg.pairs_file, model.config.block_size, model.config.n_vocab)
    check_pairs(pairs, cfg.pairs_file, model.config.bk_id, rule)
    questions = [dict(question=p["question"]) for p in pairs if p["question"] is not None]
    task.check_train(questions)  # pairs of test problems would leak the held-out set into training
    phash = pairs_hash(pairs)

    # the frozen reference: computed once, with the initial weights, and kept with the run
    ref_file = os.path.join(cfg.out_dir, "ref_logprobs.pt")
    if resuming and os.path.exists(ref_file):
        ref = torch.load(ref_file)
        if ref["pairs_hash"] != phash:
            raise SystemExit(f"error: {cfg.pairs_file} is not the pairs file this run started with")
    else:
        ref_model = model if not resuming else load_stage_model(ref_path, device, "DPO")[0]
        ref_c, ref_r = reference_logprobs(ref_model, pairs, tok.bk_id, rule, 2 * cfg.batch_size, device)
        ref = dict(chosen=ref_c.cpu(), rejected=ref_r.cpu(), pairs_hash=phash, reference=ref_path)
        del ref_model
        if master:
            torch.save(ref, ref_file)  # GPT.save carries it into every later checkpoint folder
    ref_c, ref_r = ref["chosen"].to(device), ref["rejected"].to(device)

    choose_trainable(model, cfg, tok.bk_id)   # all, the BK rows (--embedding_only), or LoRA adapters (--lora_rank)
    raw = model
    model = wrap(model, cfg, ddp, cfg.fsdp)   # before the optimizer: FSDP replaces the parameters with shards
    optimizer = make_optimizer(raw, cfg)
    start, log = restore(raw, optimizer, cfg, resuming, master)
    global_size = cfg.batch_size * cfg.grad_accum * world
    held_out = task.problems("test", n=cfg.eval_n, seed=cfg.seed + 1)
    meta = dict(task=task_name, task_kwargs=task_kwargs, **asdict(rule), max_new_tokens=max_new_tokens,
                stage="dpo", dpo_reference=ref_path)
    if master:
        print(f"model: {raw.num_params() / 1e6:.2f}M parameters | reference {ref_path} | {len(pairs)} pairs | "
              f"loss={cfg.loss_type} beta={cfg.beta} | global batch {global_size} pairs | {rule} | world {world}")

    run_eval = lambda step: eval_and_log(step, raw, tok, task, held_out, rule, cfg, log, max_new_tokens)

    if master and cfg.eval_at_start and start == 0 and cfg.eval_interval > 0:
        run_eval(0)
    save = lambda step: save_checkpoint(model, optimizer, step, cfg, meta, log)
    if start == 0:   # every rank: under FSDP the save gathers the shards
        save(0)   # a run killed before its first periodic save can still be resumed
    bar = progress_bar(cfg, start, master, "dpo")
    t0, done = time.time(), start
    per_rank = global_size // world
    per_micro = per_rank // cfg.grad_accum
    for step in bar:
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        idx = pair_indices(step, cfg.seed, len(pairs), global_size)
        mine = idx[rank * per_rank:(rank + 1) * per_rank]
        stats = dpo_step(model, pairs, lambda a: mine[a * per_micro:(a + 1) * per_micro], ref_c, ref_r, tok.bk_id, rule,
                         cfg, ddp, world, global_size, device)
        stop_if_not_finite(stats[0], step, cfg)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if master and (step % cfg.log_interval == 0 or done == cfg.max_iters):
            l, rc, rr, acc, lc, lr_ = stats.tolist()
            log(step=step, loss=l, lr=lr, epoch=step * global_size / len(pairs), **{
                "rewards/chosen": rc, "rewards/rejected": rr, "rewards/margins": rc - rr, "rewards/accuracies": acc,
                "logps/chosen": lc, "logps/rejected": lr_}, elapsed_s=time.time() - t0)
            bar.set_postfix(loss=f"{l:.4f}", margin=f"{rc - rr:.3f}", acc=f"{acc:.2f}")
        if end_step(done, cfg, master, ddp, lambda: save(done), run_eval, cfg.fsdp):
            break
    if master:
        write_run_curves(cfg.out_dir)   # curves.svg beside metrics.jsonl
    finish(raw, cfg, ddp, world, log, master, done, start, t0, "train_dpo.py",
           then=f"python evaluate.py --ckpt={cfg.out_dir}   or   python generate.py --ckpt={cfg.out_dir} --prompt ...")


if __name__ == "__main__":
    cli(main)
