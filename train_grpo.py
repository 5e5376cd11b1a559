"""
GRPO on top of an SFT checkpoint: the second stage, which teaches *when* to backtrack.

    python train_grpo.py                                    # from out/sft, ~10 minutes on 2 CPU cores
    python train_grpo.py --init_from=/path/to/sft --loss_type=dr_grpo --scale_rewards=none
    python train_grpo.py --num_iterations=2 --beta=0.02     # PPO-style clipping, KL to the SFT model
    torchrun --standalone --nproc_per_node=2 train_grpo.py

Each step draws P prompts (a pure function of seed and step) and samples G completions of each as
ONE batch through decode.generate, with the checkpoint's context policy (under `rewind` every row
rewinds its own cache in place). Each completion is scored on its resolved text (reward.py), the
rewards are turned into group-relative advantages, and the policy gradient runs on the log-probs
of the sampled actions recomputed by one training forward over data.layout of each trace, at the
sampling temperature/top-k/top-p, so that they are the very numbers the sampler drew with
(invariant 4 of the semantics page; checked at runtime on every first pass).

Loss (per action = per sampled token, BKs included; nothing exists after end-of-text, since
generation stops a row there):
    dapo     sum over the global batch of token losses / number of tokens in the global batch
    dr_grpo  sum / (number of sequences * dr_grpo_tokens, default max_new_tokens)   (a constant: no length bias)
    grpo     mean over each sequence, then mean over sequences
Token loss: -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) + beta * KL_k3, with
r = pi / pi_old; r == 1 unless a batch is reused for several passes (num_iterations > 1).
"""
import contextlib
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

from checkpoint import load_stage_model, restore, save_checkpoint, starting_values
from common import all_reduce_sum, cli, parse_kwargs, reduce_dict, require, step_seed
from data import Rule, RuleFlags, Trace, collate, layout
from decode import generate
from heldout import eval_and_log
from model import GPT, action_logprobs, lora_modules, unwrap
from plot import write_run_curves
from reward import COMPONENTS, RewardConfig, prm_process_score, score, step_wrong_probs, total
from schedules import WeightSchedule, budget_at, lr_at
from tasks import checkpoint_task, prompt_ids
from training import (choose_trainable, end_step, finish, grad_sync, make_optimizer, progress_bar, start_run,
                      stop_if_not_finite, wrap)


@dataclass
class Config(RuleFlags):   # --policy, --slot_bans, --max_retries: the checkpoint's unless given (data.RuleFlags)
    out_dir: str = "out/grpo"
    init_from: str = "out/sft"       # an SFT checkpoint folder | resume (continue out_dir exactly)
    # task (default: the checkpoint's own task, settings and context policy)
    task: str = ""
    task_kwargs: str = ""
    chat: bool = True                # prompts in the checkpoint's chat template when it has one; False: plain
    n_train: int = 50000             # size of the training problem pool
    # rollouts
    prompts_per_step: int = 16       # P: prompts per step, over all processes
    group_size: int = 8              # G: completions per prompt
    temperature: float = 1.0         # sampling temperature; log-probs are recomputed at the same one
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    max_backtracks: int = 8          # hard cap in generation: BK is banned once this many are spent
    # reward (reward.py)
    reward_weights: str = "constant"  # preset (constant | notes) or 'start:outcome=..,process=..;start:...'
    prm: str = ""                    # a checkpoint with a verifier head: the process component is its step scores
                                     # (reward.prm_process_score), not the task's step checks; "" = the checks
    prm_threshold: float = 0.5       # a step costs process reward only where the PRM's p(wrong) exceeds this
    budget: str = "exp"              # backtrack budget: exp | none | phases 'start:budget,...'
    budget_max: float = 8.0          # exp: budget = max(budget_min, budget_max * budget_decay ** progress)
    budget_min: float = 2.0
    budget_decay: float = 0.25
    clean_bonus: float = 1.0
    correction_bonus: float = 0.5
    unnecessary_penalty: float = 0.2
    failed_penalty: float = 0.2
    cap_penalty: float = 1.0
    # loss
    loss_type: str = "dapo"          # dapo | dr_grpo | grpo
    dr_grpo_tokens: int = 0          # dr_grpo normaliser per sequence; 0 = max_new_tokens
    scale_rewards: str = "group"     # group | batch | none (divide centred rewards by the group's std, the batch's, or not)
    mask_truncated: bool = False     # no loss on completions that did not end (cut off by max_new_tokens or a full
                                     # cache, or stuck with every token banned)
    num_iterations: int = 1          # optimizer passes over each batch of rollouts
    epsilon_low: float = 0.2         # ratio clipping (only bites when num_iterations > 1)
    epsilon_high: float = 0.28
    beta: float = 0.0                # KL to the frozen initial model (k3); 0 keeps no reference model
    # optimisation
    micro_batch: int = 64            # completions per forward/backward (memory; the loss is the same)
    max_iters: int = 150
    lr: float = 1e-4                 # constant after warmup: on the default SFT model, accuracy at T=1 saturates in ~50 steps
    min_lr: float = 1e-4
    warmup_iters: int = 5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    embedding_only: bool = False     # train only the backtrack token's rows (research notes 5.4)
    lora_rank: int = 0                # > 0: train LoRA adapters of this rank on a frozen model; a checkpoint with adapters trains them
    lora_alpha: float = 16.0          # adapter scale alpha / rank
    lora_targets: str = "attn,mlp"    # the block linears adapted: attn (fused q/k/v and output), mlp, or both
    lora_bk: bool = True              # with adapters, also train the backtrack token's embedding rows
    # evaluation and logging
    eval_interval: int = 50
    eval_at_start: bool = True       # evaluate the initial checkpoint too (the 'before' numbers)
    eval_n: int = 200
    eval_temperature: float = 1.0
    log_interval: int = 1
    save_interval: int = 50
    stop_at: int = 0                 # stop (and save) after this many steps, as if interrupted
    # system
    seed: int = 1337
    device: str = "cpu"
    compile: bool = False
    progress: bool = True

# -----------------------------------------------------------------------------
# the pieces of the objective, as plain functions (tests pin them against hand-computed values)


def group_advantages(rewards, group_size, scale_rewards="group", batch_std=None, eps=1e-4):
    """Rewards (N,) in groups of group_size consecutive completions -> advantages (N,).
    Centred on the group mean, then divided by the group's std (group), the whole batch's
    (batch; pass batch_std when the batch spans several processes), or not at all (none,
    Dr. GRPO). std is the unbiased one; eps keeps a constant group at 0."""
    r = rewards.view(-1, group_size)
    a = r - r.mean(1, keepdim=True)
    if scale_rewards == "group":
        a = a / (r.std(1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        a = a / ((rewards.std() if batch_std is None else batch_std) + eps)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be group | batch | none, not {scale_rewards!r}")
    return a.reshape(-1)


def sequence_weights(lengths, loss_type, n_seq, n_tok, max_new_tokens):
    """Weight of each token of each sequence in the loss sum (lengths: (N,) actions per sequence;
    n_seq, n_tok: sequences and tokens in the GLOBAL batch that carry loss). A masked sequence is
    given length 0 by the caller."""
    lengths = lengths.float()
    if loss_type == "dapo":
        w = torch.full_like(lengths, 1.0 / max(n_tok, 1))
    elif loss_type == "dr_grpo":
        w = torch.full_like(lengths, 1.0 / (max(n_seq, 1) * max_new_tokens))
    elif loss_type == "grpo":
        w = 1.0 / (lengths.clamp(min=1) * max(n_seq, 1))
    else:
        raise ValueError(f"loss_type must be dapo | dr_grpo | grpo, not {loss_type!r}")
    return torch.where(lengths > 0, w, torch.zeros_like(w))


def clipped_objective(logp, old_logp, adv, eps_low, eps_high):
    """Per token: the PPO loss -min(r A, clip(r) A), and which tokens were clipped low/high."""
    ratio = torch.exp(logp - old_logp)
    loss = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    low = (ratio < 1 - eps_low) & (adv < 0)
    high = (ratio > 1 + eps_high) & (adv > 0)
    return loss, low, high


def kl_k3(logp, ref_logp):
    """k3 estimator of KL(pi || ref) per sampled token: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1

# -----------------------------------------------------------------------------
# rollouts


@torch.no_grad()
def rollout(model, tok, task, problems, cfg, rule, seed, budget, weights, rc, prm=None):
    """G completions of each problem, generated together; each scored (the process component by
    `prm`, a frozen model with a verifier head, when given). Returns one dict per completion
    (group after group): prompt, response, logprobs, reward, components."""
    raw = unwrap(model)
    was_training = raw.training
    raw.eval()
    prompts = [prompt_ids(tok, task, p) for p in problems for _ in range(cfg.group_size)]
    outs = generate(raw, prompts, max_new_tokens=cfg.max_new_tokens, rule=rule, temperature=cfg.temperature,
                    top_k=cfg.top_k, top_p=cfg.top_p, max_backtracks=cfg.max_backtracks, seed=seed,
                    stop_ids=tok.stop_ids)
    raw.train(was_training)
    process = [None] * len(outs)
    if prm is not None:
        probs = step_wrong_probs(prm, tok, prompts, [o["resolved"] for o in outs], rule, cfg.micro_batch)
        process = [prm_process_score(p, cfg.prm_threshold) for p in probs]
    rows = []
    for i, o in enumerate(outs):
        c = score(task, tok, problems[i // cfg.group_size], o["response"], budget, rc, process[i])
        rows.append(dict(prompt=prompts[i], response=o["response"], logprobs=o["logprobs"],
                         reward=total(c, weights), **c))
    return rows


def recompute_batches(rows, tok, rule, cfg, device):
    """Collated training batches of micro_batch rows each, with the index of each batch's first row."""
    out = []
    for s in range(0, len(rows), cfg.micro_batch):
        lays = [layout(Trace(r["prompt"], r["response"]), tok.bk_id, rule, mask_errors=False,
                       max_backtracks=cfg.max_backtracks) for r in rows[s:s + cfg.micro_batch]]
        out.append((s, collate(lays, device=device)))
    return out


def rollout_logprobs(model, batch, cfg):
    """Log-prob of each action of a batch under the distribution the sampler drew from: the same
    temperature, top-k, top-p and bans (the bans travel in the layout)."""
    return action_logprobs(model, batch, cfg.temperature, cfg.top_k, cfg.top_p)


class Reference:
    """The KL's reference under LoRA, with no copy of the weights: the model's own frozen base with
    the trainable tensors (the adapters, and the BK rows when they train) put back to their values
    in the starting checkpoint while the block is entered (`with ref:`), and restored after it.
    Adapters the checkpoint lacks (added by this stage) start at B = 0, so the reference is then
    the base model itself. Read from the checkpoint file, not the live model, so a resumed run has
    the same reference as the run it continues."""

    def __init__(self, model, path, bk_id):
        self.saved = starting_values(model, path, bk_id)   # (tensor, row or None, its starting value)

    @torch.no_grad()
    def swap(self):
        for p, row, v in self.saved:
            cur = (p[row] if row is not None else p).clone()
            (p[row] if row is not None else p).copy_(v)
            v.copy_(cur)

    def __enter__(self):
        self.swap()

    def __exit__(self, *exc):
        self.swap()

# -----------------------------------------------------------------------------


def check_args(cfg, world):
    """GRPO's own argument rules (training.check_train_config has the shared ones)."""
    require(cfg, "prompts_per_step micro_batch n_train num_iterations", lambda v: v >= 1, "must be at least 1")
    require(cfg, "beta top_k max_new_tokens dr_grpo_tokens epsilon_low epsilon_high", lambda v: v >= 0, "must be >= 0")
    try:   # parsed here, before anything is written, not first at step 0
        budget_at(cfg.budget, 0.0, cfg.budget_max, cfg.budget_min, cfg.budget_decay)
        WeightSchedule.from_string(cfg.reward_weights)
    except ValueError as e:
        raise SystemExit(f"error: --budget={cfg.budget} --reward_weights={cfg.reward_weights}: {e}")
    require(cfg, "top_p", lambda v: 0 < v <= 1, "must be in (0, 1]")
    require(cfg, "group_size", lambda v: v >= 2, "must be at least 2: advantages are relative to the group")
    Rule.from_flags(cfg)   # the decoding-rule flags parse
    if cfg.prompts_per_step % world or cfg.prompts_per_step < world:
        raise SystemExit(f"error: --prompts_per_step={cfg.prompts_per_step} must divide among {world} processes")
    if cfg.max_new_tokens < 1 or cfg.temperature <= 0:
        raise SystemExit(f"error: --max_new_tokens={cfg.max_new_tokens} --temperature={cfg.temperature}: rollouts "
                         "sample at least one token at a temperature > 0")
    for k, allowed in (("loss_type", ("dapo", "dr_grpo", "grpo")), ("scale_rewards", ("group", "batch", "none"))):
        if getattr(cfg, k) not in allowed:
            raise SystemExit(f"error: --{k}={getattr(cfg, k)}: expected one of {', '.join(allowed)}")
    if not 0 <= cfg.prm_threshold < 1:
        raise SystemExit(f"error: --prm_threshold={cfg.prm_threshold}: must be in [0, 1)")
    if cfg.prm and not os.path.isfile(os.path.join(cfg.prm, "config.json")):
        raise SystemExit(f"error: no checkpoint at --prm={cfg.prm!r}")


def load_prm(path, tok, device):
    """The frozen process reward model: a checkpoint with a verifier head, on the policy's tokenizer.
    A separate copy, so its scores stay fixed while the policy trains (the policy's own head reads
    a trunk that moves)."""
    prm = GPT.from_pretrained(path, device=device)
    if prm.verifier is None:
        raise SystemExit(f"error: --prm={path!r} has no verifier head (train it with train_sft.py --verifier_weight > 0)")
    if prm.config.n_vocab != tok.n_vocab:
        raise SystemExit(f"error: --prm={path!r} has {prm.config.n_vocab} tokens, the policy's tokenizer "
                         f"{tok.n_vocab}: a PRM must share the policy's tokenizer")
    return prm.eval().requires_grad_(False)


def advantages(rows, cfg, ddp):
    """Group-relative advantages (a group never spans processes; the batch std may) and each
    completion's token weight (sequence_weights, over the global batch). Returns (rewards, adv,
    w_seq, truncated, lengths)."""
    rewards = torch.tensor([r["reward"] for r in rows], dtype=torch.float64)
    batch_std = None
    if cfg.scale_rewards == "batch":
        s = all_reduce_sum(torch.tensor([rewards.sum(), (rewards ** 2).sum(), float(len(rows))],
                                        dtype=torch.float64), ddp)
        n = float(s[2])
        batch_std = math.sqrt(max(float(s[1]) - float(s[0]) ** 2 / n, 0.0) / max(n - 1, 1.0))
    adv = group_advantages(rewards, cfg.group_size, cfg.scale_rewards, batch_std).float()
    truncated = torch.tensor([not r["ended"] for r in rows])
    lengths = torch.tensor([len(r["response"]) for r in rows])
    counted = lengths.masked_fill(truncated, 0) if cfg.mask_truncated else lengths
    n_glob = all_reduce_sum(torch.tensor([float((counted > 0).sum()), float(counted.sum()), float(len(rows))],
                                         dtype=torch.float64), ddp)
    n_seq = int(n_glob[2]) if cfg.loss_type == "dr_grpo" else int(n_glob[0])
    dr_tokens = cfg.dr_grpo_tokens or cfg.max_new_tokens   # dr_grpo's constant length
    w_seq = sequence_weights(counted, cfg.loss_type, n_seq, int(n_glob[1]), dr_tokens)
    return rewards, adv, w_seq, truncated, lengths


def check_recompute(lp, rows, step):
    """Invariant 4: the recompute scores what the sampler drew from. Returns the rollout's own
    log-probs of these rows, which are the ratio's pi_old."""
    rec = torch.tensor([x for r in rows for x in r["logprobs"]], device=lp.device)
    assert rec.shape == lp.shape, "layout actions do not match the sampled actions"
    err = (lp.detach() - rec).abs().max().item() if rec.numel() else 0.0
    # The two paths run different fp32 kernels (cached decoding with packed weights; one full
    # forward): on the default run the gap averages 1e-7 a token and reached 1.5e-4 at one token in
    # 22 steps, while a real disagreement (a wrong mask, temperature or ban) moves log-probs by
    # 1e-2 and more
    if not err <= 1e-3:
        raise RuntimeError(f"recomputed log-probs differ from the rollout's by {err:.2e} "
                           f"(step {step}): training and sampling distributions disagree")
    return lp.detach()


def policy_update(model, raw, ref, optimizer, batches, rows, adv, w_seq, cfg, ddp, world, step):
    """num_iterations passes over the step's batches, each one optimizer step: the clipped
    surrogate, plus beta * KL to the reference. Returns the summed stats of this rank."""
    old = [None] * len(batches)      # log-probs of the first pass (== the rollout's), the ratio's pi_old
    ref_lp = [None] * len(batches)
    lora_ref = isinstance(ref, Reference)
    stats = dict(loss=0.0, kl=0.0, clip_low=0.0, clip_high=0.0, tokens=0.0)
    for it in range(cfg.num_iterations):
        for k, (s0, batch) in enumerate(batches):
            with grad_sync(model, ddp, k == len(batches) - 1):
                if it == 0 and ref is not None:   # before the policy's forward: the LoRA reference swaps weights in place
                    with torch.no_grad(), (ref if lora_ref else contextlib.nullcontext()):
                        ref_lp[k] = rollout_logprobs(raw if lora_ref else ref, batch, cfg)
                lp = rollout_logprobs(model, batch, cfg)
                if it == 0:
                    old[k] = check_recompute(lp, rows[s0:s0 + cfg.micro_batch], step)
                row = batch.act_row + s0
                a, w = adv.to(lp.device)[row], w_seq.to(lp.device)[row]
                tok_loss, low, high = clipped_objective(lp, old[k], a, cfg.epsilon_low, cfg.epsilon_high)
                if ref is not None:
                    kl = kl_k3(lp, ref_lp[k])
                    tok_loss = tok_loss + cfg.beta * kl
                    stats["kl"] += float((kl.detach() * (w > 0)).sum())
                # DDP averages gradients over processes; the weights already hold the global
                # normaliser, so scale by world to get the sum over the global batch
                loss = (tok_loss * w).sum() * world
                loss.backward()
            stats["loss"] += loss.item() / world
            live = w > 0
            stats["clip_low"] += float((low & live).sum())
            stats["clip_high"] += float((high & live).sum())
            stats["tokens"] += float(live.sum())
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return stats


def step_metrics(rows, rewards, lengths, truncated, stats, cfg, ddp):
    """The step's metrics, summed over processes, as the JSONL line's fields (without step, lr and
    the timings)."""
    G = cfg.group_size
    s = dict(n=len(rows), reward=rewards.sum(), reward_sq=(rewards ** 2).sum(),
             zero_std_groups=(rewards.view(-1, G).std(1) < 1e-8).sum(), groups=len(rows) // G,
             completion_len=lengths.sum(), truncated=truncated.sum(),
             bk=sum(r["n_bk"] for r in rows), backtracked=sum(r["n_bk"] > 0 for r in rows),
             over_budget=sum(r["over_budget"] for r in rows), acc=sum(r["outcome"] == 1.0 for r in rows),
             fixed=sum(r["fixed"] for r in rows), failed=sum(r["failed"] for r in rows),
             unnecessary=sum(r["unnecessary"] for r in rows), process_rule=sum(r["process_rule"] for r in rows),
             **stats)
    for k in COMPONENTS:
        s[k] = sum(r[k] for r in rows)
        s[k + "_sq"] = sum(r[k] ** 2 for r in rows)
    s = reduce_dict(s, ddp)
    n, ntok = s["n"], max(s["tokens"], 1.0)
    std = lambda k: math.sqrt(max(s[k + "_sq"] / n - (s[k] / n) ** 2, 0.0))
    m = dict(loss=s["loss"] / cfg.num_iterations,
             reward_mean=s["reward"] / n, reward_std=std("reward"), zero_std_groups=s["zero_std_groups"] / s["groups"],
             completion_len=s["completion_len"] / n, truncated=s["truncated"] / n, bk_per_sample=s["bk"] / n,
             share_backtracked=s["backtracked"] / n, over_budget=s["over_budget"] / n,
             bk_fixed=s["fixed"] / n, bk_failed=s["failed"] / n, bk_unnecessary=s["unnecessary"] / n,
             process_rule=s["process_rule"] / n,   # the step checks' share, also under a PRM
             acc=s["acc"] / n, clip_low=s["clip_low"] / ntok, clip_high=s["clip_high"] / ntok,
             clip_region=(s["clip_low"] + s["clip_high"]) / ntok, kl=s["kl"] / ntok)
    for k in COMPONENTS:
        m[f"reward/{k}_mean"] = s[k] / n
        m[f"reward/{k}_std"] = std(k)
    return m


def main(argv=None):
    cfg, ddp, rank, world, device = start_run(Config(), argv, check_args)
    master = rank == 0
    resuming = cfg.init_from == "resume"
    model, tok, init_meta = load_stage_model(cfg.out_dir if resuming else cfg.init_from, device, "GRPO", cfg.chat)
    cfg.chat = tok.chat   # saved with the run: what its prompts were
    choose_trainable(model, cfg, tok.bk_id)   # all, the BK rows (--embedding_only), or LoRA adapters (--lora_rank)
    sft_path = init_meta.get("sft_checkpoint", cfg.init_from) if resuming else cfg.init_from
    task_name, task_kwargs, task = checkpoint_task(init_meta, cfg.task,
                                                   parse_kwargs(cfg.task_kwargs) if cfg.task_kwargs else None)
    rule = Rule.from_flags(cfg, init_meta)
    raw = model
    model = wrap(model, cfg, ddp)
    optimizer = make_optimizer(raw, cfg)
    start, log = restore(raw, optimizer, cfg, resuming, master)
    ref = None
    if cfg.beta > 0 and lora_modules(raw):   # the initial model is the frozen base with the trainable tensors' first values
        ref = Reference(raw, sft_path, tok.bk_id)
    elif cfg.beta > 0:  # the frozen initial model, for the KL term
        ref = GPT.from_pretrained(sft_path, device=device).requires_grad_(False)
    prm = load_prm(cfg.prm, tok, device) if cfg.prm else None
    rc = RewardConfig(cfg.clean_bonus, cfg.correction_bonus, cfg.unnecessary_penalty, cfg.failed_penalty, cfg.cap_penalty)
    weight_schedule = WeightSchedule.from_string(cfg.reward_weights)
    pool = task.problems("train", n=cfg.n_train, seed=cfg.seed)
    held_out = task.problems("test", n=cfg.eval_n, seed=cfg.seed + 1)
    meta = dict(task=task_name, task_kwargs=task_kwargs, **asdict(rule), max_new_tokens=cfg.max_new_tokens,
                stage="grpo", sft_checkpoint=sft_path)
    P_local = cfg.prompts_per_step // world
    if master:
        print(f"model: {raw.num_params() / 1e6:.2f}M parameters | from {sft_path} | task={task_name} {rule} | "
              f"{cfg.prompts_per_step} prompts x {cfg.group_size} completions per step | loss={cfg.loss_type} | "
              f"world {world}")

    run_eval = lambda step: eval_and_log(step, raw, tok, task, held_out, rule, cfg, log, cfg.max_new_tokens,
                                         cfg.max_backtracks)
    if master and cfg.eval_at_start and start == 0 and cfg.eval_interval > 0:
        run_eval(0)
    save = lambda step: save_checkpoint(model, optimizer, step, cfg, meta, log)
    if start == 0:   # every rank: under FSDP the save gathers the shards
        save(0)   # a run killed before its first periodic save can still be resumed
    bar = progress_bar(cfg, start, master, "grpo")
    t0, gen_tokens, gen_time, done = time.time(), 0, 0.0, start
    for step in bar:
        progress = step / cfg.max_iters
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        weights = weight_schedule.at(progress)
        budget = budget_at(cfg.budget, progress, cfg.budget_max, cfg.budget_min, cfg.budget_decay)

        # 1. rollouts: this rank's share of the step's prompts, G completions each, one generate call
        rng = random.Random(step_seed(cfg.seed, step))
        picked = [pool[rng.randrange(len(pool))] for _ in range(cfg.prompts_per_step)]
        mine = picked[rank * P_local:(rank + 1) * P_local]
        tg = time.time()
        rows = rollout(model, tok, task, mine, cfg, rule, step_seed(cfg.seed, step) * 1024 + rank,
                       budget, weights, rc, prm)
        gen_time += time.time() - tg
        gen_tokens += sum(len(r["response"]) for r in rows)
        # 2. advantages, group-relative
        rewards, adv, w_seq, truncated, lengths = advantages(rows, cfg, ddp)
        # 3. policy gradient on the recomputed log-probs
        batches = recompute_batches(rows, tok, rule, cfg, device)
        stats = policy_update(model, raw, ref, optimizer, batches, rows, adv, w_seq, cfg, ddp, world, step)
        # 4. metrics, summed over processes
        done = step + 1
        m = step_metrics(rows, rewards, lengths, truncated, stats, cfg, ddp)
        stop_if_not_finite(m["loss"], step, cfg)
        if master and (step % cfg.log_interval == 0 or done == cfg.max_iters):
            log(step=step, lr=lr, budget=budget, weights=weights, **m,
                rollout_tokens_per_s=gen_tokens * world / max(gen_time, 1e-9), rollout_s=gen_time,
                elapsed_s=time.time() - t0)
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}", acc=f"{m['acc']:.3f}", bk=f"{m['bk_per_sample']:.2f}",
                            tok_s=f"{gen_tokens * world / max(gen_time, 1e-9):.0f}")
        if end_step(done, cfg, master, ddp, lambda: save(done), run_eval):
            break
    if master:
        write_run_curves(cfg.out_dir)   # curves.svg beside metrics.jsonl
    finish(raw, cfg, ddp, world, log, master, done, start, t0, "train_grpo.py",
           then=f"python evaluate.py --ckpt={cfg.out_dir}   or   python generate.py --ckpt={cfg.out_dir} --prompt ...")


if __name__ == "__main__":
    cli(main)
