"""
Held-out evaluation: one completion per problem under a decoding rule, scored on its resolved text
by the task's verifier, with the backtracking statistics beside accuracy (how often, how deep, how
precise: reward.deletion_stats), and the periodic evaluation a training stage logs.
evaluate.py is the command line over this.
"""
import os

import torch
from tqdm import tqdm

from common import sharded
from data import Rule, count_backtracks
from decode import generate
from reward import deletion_stats
from tasks import prompt_ids


@torch.no_grad()
def evaluate(model, tok, task, problems, rule=Rule(), temperature=0.0, top_k=0, top_p=1.0,
             max_new_tokens=128, max_backtracks=None, batch_size=64, seed=0, progress=False, pop_below=0.0,
             trigger=0.0):
    """Generate one completion per problem under the decoding rule (a data.Rule), stopping at any of
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
        outs = generate(model, prompts, max_new_tokens=max_new_tokens, rule=rule, temperature=temperature,
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
    Greedy (and a temperature of 0) is skipped where the rule leaves it undefined (Rule.greedy_defined)."""
    res = {}
    passes = [("greedy", 0.0), ("t1", temperature)]
    for label, T in passes if rule.greedy_defined else [p for p in passes if p[1] > 0]:
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
        get = lambda k: res.get(k, float("nan"))   # nan: a pass the rule does not define (Rule.greedy_defined)
        tqdm.write(f"step {step}: held-out acc greedy {get('eval/greedy/acc'):.3f} | T={cfg.eval_temperature} "
                   f"{get('eval/t1/acc'):.3f} | bk/sample greedy {get('eval/greedy/bk_per_sample'):.2f} "
                   f"T={cfg.eval_temperature} {get('eval/t1/bk_per_sample'):.2f}")
    return res
