"""
Evaluate a checkpoint on held-out problems: accuracy after resolve, greedy and sampled, with
backtrack statistics.

    python evaluate.py --ckpt=out/sft --n=500
    python evaluate.py --ckpt=out/grpo --temperature=0.7 --out=grpo_eval.json

Every number is computed on the resolved completion (docs/backtrack-semantics.md §1) with the
task's own verifier and the one answer parser (tasks.parse_answer) that rewards use too. The
metrics are printed and written to <ckpt>/eval.json (or --out).
"""
import json
import os
import sys
from dataclasses import dataclass

from common import cli, configure, decoding_rule, evaluate, load_model, parse_kwargs
from data import as_rule
from decode import greedy_decodable
from tasks import checkpoint_task


@dataclass
class Config:
    ckpt: str = "out/sft"
    task: str = ""                   # default: the checkpoint's task (and its settings)
    n: int = 500                     # held-out problems
    task_kwargs: str = ""            # e.g. "min_vars=8,max_vars=10" (a longer split), "shots=8" (gsm8k); default: the checkpoint's
    chat: bool = True                # prompts in the checkpoint's chat template when it has one; False: plain
    policy: str = ""                 # rewind | keep; "" = the checkpoint's
    slot_bans: str = ""              # on | off; "" = the checkpoint's (docs/backtrack-semantics.md §4)
    max_retries: str = ""            # per-slot retry limit: a number | none; "" = the checkpoint's
    temperature: float = 1.0         # the sampled pass (greedy is always run too)
    samples: int = 1                 # > 1: also k samples per problem at --temperature: majority vote and pass@k
    max_new_tokens: int = 0          # 0 = the checkpoint's
    max_backtracks: int = -1         # cap per sample; -1 = none
    pop_below: float = 0.0           # > 0: BK where the allowed tokens hold less than this share of the model's mass (decode.generate)
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


def main(argv=None):
    cfg = Config()
    configure(cfg, sys.argv[1:] if argv is None else argv)
    if cfg.n < 1:
        raise ValueError(f"--n={cfg.n}: evaluate at least one problem")
    if cfg.temperature < 0:
        raise ValueError(f"--temperature={cfg.temperature}: must be >= 0 (0 = greedy)")
    if not 0 <= cfg.pop_below < 1:
        raise ValueError(f"--pop_below={cfg.pop_below}: a share of probability in [0, 1)")
    if cfg.samples < 1 or (cfg.samples > 1 and cfg.temperature == 0):
        raise ValueError(f"--samples={cfg.samples}: at least 1, and several need --temperature > 0")
    decoding_rule(cfg, {})   # checks the flags before any work
    model, tok = load_model(cfg.ckpt, device=cfg.device, chat=cfg.chat)
    meta = model.meta
    name, task_kwargs, task = checkpoint_task(meta, cfg.task, parse_kwargs(cfg.task_kwargs) if cfg.task_kwargs else None)
    rule = decoding_rule(cfg, meta)
    problems = task.problems("test", n=cfg.n, seed=cfg.seed)
    max_new_tokens = cfg.max_new_tokens or meta.get("max_new_tokens", 128)
    cap = None if cfg.max_backtracks < 0 else cfg.max_backtracks
    result = {}
    passes = [("greedy", 0.0), (f"T={cfg.temperature}", cfg.temperature)]
    if not greedy_decodable(**as_rule(rule)):   # rewind without slot bans or a retry limit: sampling only
        passes = [p for p in passes if p[1] > 0]
        print(f"greedy skipped: {rule} leaves greedy decoding undefined (docs/backtrack-semantics.md §4)")
        if not passes:
            raise ValueError(f"--temperature=0 with {rule}: greedy rewind decoding needs slot bans or a retry limit")
    for label, T in passes:
        m, _ = evaluate(model, tok, task, problems, rule, T, max_new_tokens=max_new_tokens, max_backtracks=cap,
                        seed=cfg.seed, progress=True, pop_below=cfg.pop_below)
        result[label] = m
    if cfg.samples > 1:
        _, records = evaluate(model, tok, task, [p for p in problems for _ in range(cfg.samples)], rule,
                              cfg.temperature, max_new_tokens=max_new_tokens, max_backtracks=cap, seed=cfg.seed + 1,
                              progress=True, pop_below=cfg.pop_below)
        result[f"vote@{cfg.samples}"] = vote(task, problems, records, cfg.samples)
    out = cfg.out or os.path.join(cfg.ckpt, "eval.json")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(ckpt=cfg.ckpt, task=name, task_kwargs=task_kwargs, chat=tok.chat, **rule, **result), f, indent=2)
    os.replace(tmp, out)   # a crash mid-write never leaves half a file where a good one was
    print(f"{cfg.ckpt} | task={name} | {rule} | chat={tok.chat} | n={len(problems)}")
    for label, m in result.items():
        print(f"{label:>8}: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()))
    print(f"metrics written to {out}")


if __name__ == "__main__":
    cli(main, quiet_pipe=True)
