"""
Evaluate a checkpoint on held-out problems: accuracy after resolve, greedy and sampled, with
backtrack statistics.

    python evaluate.py --ckpt=out/sft --n=500
    python evaluate.py --ckpt=out/grpo --temperature=0.7 --out=grpo_eval.json

Every number is computed on the resolved completion (docs/backtrack-semantics.md §1) with the
task's own verifier and the one answer parser (tasks/answers.py) that rewards use too. The
metrics are printed and written to <ckpt>/eval.json (or --out).
"""
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from checkpoint import load_model
from common import cli, configure, parse_kwargs
from data import Rule, RuleFlags
from heldout import evaluate, longest_run
from tasks import checkpoint_task, prompt_ids


@dataclass
class Config(RuleFlags):   # --policy, --slot_bans, --max_retries: the checkpoint's unless given (data.RuleFlags)
    ckpt: str = "out/sft"
    task: str = ""                   # default: the checkpoint's task (and its settings)
    n: int = 500                     # held-out problems
    task_kwargs: str = ""            # e.g. "min_vars=8,max_vars=10" (a longer split), "shots=8" (gsm8k); default: the checkpoint's
    chat: bool = True                # prompts in the checkpoint's chat template when it has one; False: plain
    temperature: float = 1.0         # the sampled pass (greedy is always run too)
    samples: int = 1                 # > 1: also k samples per problem at --temperature: majority vote and pass@k
    max_new_tokens: int = 0          # 0 = the checkpoint's
    max_backtracks: int = -1         # cap per sample; -1 = none
    oracle_search: bool = False      # also a depth-first search: the model proposes, the task's rule checker verifies (sudoku)
    pop_below: float = 0.0           # > 0: BK where the allowed tokens hold less than this share of the model's mass (decode.generate)
    trigger: float = 0.0             # > 0: BK where the verifier head's probability that the last token is wrong exceeds this
    seed: int = 0
    device: str = "cpu"
    out: str = ""                    # JSON file for the metrics; "" = <ckpt>/eval.json


def vote(task, problems, records, k):
    """k samples per problem (records in problem order, k each): accuracy of the majority answer
    (no oracle: the most common parsed answer, ties to the one reached first, judged like one
    completion), pass@k (an oracle picks any correct sample: an upper bound), and the tokens
    generated per problem, for comparisons at equal generated tokens."""
    maj = hit = 0
    for i, p in enumerate(problems):
        group = records[i * k:(i + 1) * k]
        answers = [r["parsed"] for r in group if r["parsed"] is not None]
        if answers:
            top = max(answers, key=lambda a: (answers.count(a), -answers.index(a)))
            maj += any(r["correct"] for r in group if r["parsed"] == top)
        hit += any(r["correct"] for r in group)
    n = len(problems)
    return dict(n=n, k=k, majority_acc=maj / n, pass_at_k=hit / n,
                tokens_per_problem=sum(len(r["response"]) for r in records) / n)


@torch.no_grad()
def oracle_search(model, tok, task, problems, max_new_tokens):
    """A depth-first search with the model as proposer and the task's rule checker as verifier
    (task.allowed_next: sudoku): at each step the model's most likely token among those the checker
    allows and no earlier try at this slot used; where none is left, a BK (the slot's token is
    popped and banned below). The strongest search a model without backtracking gets from a
    perfect local verifier, counted in the same actions (each write or BK one generated token).
    One full forward per write (no cache): an evaluation, not a decoder. Returns (metrics, records)
    like heldout.evaluate."""
    model.eval()
    records = []
    for p in tqdm(problems, desc="oracle search", leave=False):
        prompt = prompt_ids(tok, task, p)
        written, tried, actions = [], [set()], []
        while len(actions) < max_new_tokens:
            text = tok.decode(written)
            ok = [(tok.eot_id if c == "" else tok.encode(c)[0]) for c in task.allowed_next(p, text)]
            ok = [t for t in ok if t not in tried[-1]]
            if not ok:
                actions.append(tok.bk_id)
                if not written:
                    break   # the search is exhausted at the root
                tried.pop()
                tried[-1].add(written.pop())
                continue
            logits = model(torch.tensor([prompt + written]))[0, -1]
            t = max(ok, key=lambda i: float(logits[i]))
            actions.append(t)
            if t == tok.eot_id:
                break
            written.append(t)
            tried.append(set())
        text = tok.decode(written)
        records.append(dict(correct=bool(task.verify(text, p)), response=actions, backtracks=actions.count(tok.bk_id),
                            finished=actions[-1:] == [tok.eot_id], longest_pop=longest_run(actions, tok.bk_id)))
    n = len(records)
    return dict(n=n, acc=sum(r["correct"] for r in records) / n,
                bk_per_sample=sum(r["backtracks"] for r in records) / n,
                finished=sum(r["finished"] for r in records) / n,
                longest_pop=sum(r["longest_pop"] for r in records) / n,
                mean_len=sum(len(r["response"]) for r in records) / n), records


def forward_flops(model, prompts, records, policy):
    """Forward FLOPs per problem, about 2 x parameters per token the model reads: the prompt, then
    each action written to the context (under `rewind` a BK is not: the slot below's logits are
    cached; under `keep` it is). Attention's share, small at these lengths, is left out."""
    n_params = sum(x.numel() for x in model.parameters())
    bk = model.config.bk_id
    read = [len(pr) + sum(1 for t in r["response"] if policy == "keep" or t != bk) for pr, r in zip(prompts, records)]
    return 2 * n_params * sum(read) / max(len(read), 1)


def main(argv=None):
    cfg = Config()
    configure(cfg, sys.argv[1:] if argv is None else argv)
    if cfg.n < 1:
        raise ValueError(f"--n={cfg.n}: evaluate at least one problem")
    if cfg.temperature < 0:
        raise ValueError(f"--temperature={cfg.temperature}: must be >= 0 (0 = greedy)")
    if not 0 <= cfg.pop_below < 1:
        raise ValueError(f"--pop_below={cfg.pop_below}: a share of probability in [0, 1)")
    if not 0 <= cfg.trigger < 1:
        raise ValueError(f"--trigger={cfg.trigger}: a probability in [0, 1) (0 = off)")
    if cfg.samples < 1 or (cfg.samples > 1 and cfg.temperature == 0):
        raise ValueError(f"--samples={cfg.samples}: at least 1, and several need --temperature > 0")
    Rule.from_flags(cfg)   # checks the flags before any work
    model, tok = load_model(cfg.ckpt, device=cfg.device, chat=cfg.chat)
    meta = model.meta
    if cfg.trigger > 0 and model.verifier is None:
        raise ValueError(f"--trigger: {cfg.ckpt} has no verifier head (train one with train_sft.py --verifier_weight=1)")
    name, task_kwargs, task = checkpoint_task(meta, cfg.task, parse_kwargs(cfg.task_kwargs) if cfg.task_kwargs else None)
    if cfg.oracle_search and not hasattr(task, "allowed_next"):
        raise ValueError(f"--oracle_search: task {name!r} has no rule checker (allowed_next); sudoku has one")
    rule = Rule.from_flags(cfg, meta)
    problems = task.problems("test", n=cfg.n, seed=cfg.seed)
    max_new_tokens = cfg.max_new_tokens or meta.get("max_new_tokens", 128)
    cap = None if cfg.max_backtracks < 0 else cfg.max_backtracks
    result = {}
    passes = [("greedy", 0.0), (f"T={cfg.temperature}", cfg.temperature)]
    if not rule.greedy_defined:   # rewind without slot bans or a retry limit: sampling only
        passes = [p for p in passes if p[1] > 0]
        print(f"greedy skipped: {rule} leaves greedy decoding undefined (docs/backtrack-semantics.md §4)")
        if not passes:
            raise ValueError(f"--temperature=0 with {rule}: greedy rewind decoding needs slot bans or a retry limit")
    prompts = [prompt_ids(tok, task, p) for p in problems]
    for label, T in passes:
        m, records = evaluate(model, tok, task, problems, rule, T, max_new_tokens=max_new_tokens, max_backtracks=cap,
                              seed=cfg.seed, progress=True, pop_below=cfg.pop_below, trigger=cfg.trigger)
        result[label] = dict(m, flops_per_problem=forward_flops(model, prompts, records, rule.policy))
    if cfg.samples > 1:
        _, records = evaluate(model, tok, task, [p for p in problems for _ in range(cfg.samples)], rule,
                              cfg.temperature, max_new_tokens=max_new_tokens, max_backtracks=cap, seed=cfg.seed + 1,
                              progress=True, pop_below=cfg.pop_below, trigger=cfg.trigger)
        result[f"vote@{cfg.samples}"] = dict(vote(task, problems, records, cfg.samples), flops_per_problem=cfg.samples
                                             * forward_flops(model, [x for x in prompts for _ in range(cfg.samples)],
                                                             records, rule.policy))
    if cfg.oracle_search:
        m, records = oracle_search(model, tok, task, problems, max_new_tokens)
        result["oracle_search"] = dict(m, flops_per_problem=forward_flops(model, prompts, records, "rewind"))
    out = cfg.out or os.path.join(cfg.ckpt, "eval.json")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(ckpt=cfg.ckpt, task=name, task_kwargs=task_kwargs, chat=tok.chat, **asdict(rule), **result), f, indent=2)
    os.replace(tmp, out)   # a crash mid-write never leaves half a file where a good one was
    print(f"{cfg.ckpt} | task={name} | {rule} | chat={tok.chat} | n={len(problems)}")
    for label, m in result.items():
        print(f"{label:>8}: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()))
    print(f"metrics written to {out}")


if __name__ == "__main__":
    cli(main, quiet_pipe=True)
