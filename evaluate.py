"""
Evaluate a checkpoint on held-out problems: accuracy after resolve, greedy and sampled, with
backtrack statistics.

    python evaluate.py --ckpt out/sft --task arith --n 500

Every number is computed on the resolved completion with the task's own verifier and the one
answer parser (data.parse_answer) that rewards use too.
"""
import argparse
import json
import os
import sys

import torch
from tqdm import tqdm

from data import checkpoint_task, get_tokenizer, parse_answer
from model import GPT, generate


def deletion_stats(response, reference, bk_id):
    """Judge each deletion of a completion against the task's reference solution (ids).

    A token x written on top of surviving prefix S is wrong iff S + [x] is not a prefix of the
    reference (it diverged, or sits on a path that already had). Deleting a wrong token is a
    necessary deletion; deleting a right one is unnecessary. Tasks with several valid solutions
    (countdown, gsm8k) are judged against their one reference, so there `unnecessary` is an upper
    bound. Returns (necessary, unnecessary)."""
    stack, ok = [], []   # ok[i]: stack[:i+1] is a prefix of the reference
    good = bad = 0
    for t in response:
        if t == bk_id:
            if stack:
                stack.pop()
                if ok.pop():
                    bad += 1
                else:
                    good += 1
        else:
            i = len(stack)
            ok.append((not ok or ok[-1]) and i < len(reference) and reference[i] == t)
            stack.append(t)
    return good, bad


@torch.no_grad()
def evaluate(model, tok, task, problems, policy="rewind", temperature=0.0, top_k=0, top_p=1.0,
             max_new_tokens=128, max_backtracks=None, batch_size=64, seed=0, progress=False):
    """Generate one completion per problem and score it. Returns (metrics dict, per-sample records)."""
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
            resolved = [t for t in o["resolved"] if t != tok.eot_id]
            text = tok.decode(resolved)
            n_bk = o["response"].count(tok.bk_id)
            reference = tok.encode(p["solution"]) + [tok.eot_id]
            necessary, unnecessary = deletion_stats(o["response"], reference, tok.bk_id)
            records.append(dict(question=p["question"], answer=p["answer"], response=o["response"],
                                text=text, parsed=parse_answer(text), correct=bool(task.verify(text, p)),
                                backtracks=n_bk, necessary=necessary, unnecessary=unnecessary,
                                finished=tok.eot_id in o["resolved"],
                                hit_cap=max_backtracks is not None and n_bk >= max_backtracks))
    model.train(was_training)
    return summarize(records), records


def held_out_eval(model, tok, task, problems, policy, temperature, max_new_tokens, seed, max_backtracks=None):
    """Greedy and sampled (at `temperature`) metrics, flattened for a JSONL line: eval/greedy/*, eval/t1/*."""
    res = {}
    for label, T in (("greedy", 0.0), ("t1", temperature)):
        m, _ = evaluate(model, tok, task, problems, policy, T, max_new_tokens=max_new_tokens,
                        max_backtracks=max_backtracks, seed=seed)
        res.update({f"eval/{label}/{k}": v for k, v in m.items() if k != "n"})
    return res


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/sft")
    p.add_argument("--task", default=None, help="default: the checkpoint's task")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--policy", choices=["keep", "rewind"], default=None)
    p.add_argument("--temperature", type=float, default=1.0, help="sampled pass@1 temperature (greedy is always run)")
    p.add_argument("--max_new_tokens", type=int, default=None)
    p.add_argument("--max_backtracks", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON file for the metrics (default: <ckpt>/eval.json)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.ckpt):
        sys.exit(f"error: no checkpoint at --ckpt={args.ckpt!r}")
    model = GPT.from_pretrained(args.ckpt, device=args.device)
    meta = getattr(model, "meta", {})
    tok = get_tokenizer(model.config.tokenizer)
    name, _, task = checkpoint_task(meta, args.task)
    policy = args.policy or meta.get("policy", "rewind")
    problems = task.problems("test", n=args.n, seed=args.seed)
    mnt = args.max_new_tokens or meta.get("max_new_tokens", 128)
    result = {}
    for label, T in (("greedy", 0.0), (f"T={args.temperature}", args.temperature)):
        m, _ = evaluate(model, tok, task, problems, policy, T, max_new_tokens=mnt, max_backtracks=args.max_backtracks,
                        seed=args.seed, progress=True)
        result[label] = m
    print(f"{args.ckpt} | task={name} | policy={policy} | n={len(problems)}")
    keys = list(next(iter(result.values())).keys())
    print(f"{'':>10} " + " ".join(f"{k:>17}" for k in keys))
    for label, m in result.items():
        print(f"{label:>10} " + " ".join(f"{m[k]:>17.4f}" if isinstance(m[k], float) else f"{m[k]:>17}" for k in keys))
    out = args.out or os.path.join(args.ckpt, "eval.json")
    with open(out, "w") as f:
        json.dump(dict(ckpt=args.ckpt, task=name, policy=policy, **result), f, indent=2)


if __name__ == "__main__":
    main()
