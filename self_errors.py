"""
Backtrack traces from the model's own errors (research notes 2.6, 4.3, 4.4).

    python self_errors.py --ckpt=out/sft --n=500 --samples=4 --out=out/self_traces.jsonl
    python self_errors.py --ckpt=out/sft --locate=rollouts --rollouts=8 --out=out/located_traces.jsonl
    python train_sft.py --init_from=out/sft --out_dir=out/sft2 --traces_file=out/self_traces.jsonl \\
        --traces_ratio=0.5 --max_iters=500 --lr=3e-4 --min_lr=3e-5 --warmup_iters=10 --seed=2
    python train_dpo.py --init_from=out/sft --pairs_file=out/self_pairs.jsonl

Synthetic errors (random or plausible tokens) are not the errors a model makes, so a model trained
only on them learns to undo noise. Here the checkpoint samples completions of TRAIN problems, as it
would at inference (its own context policy, backtracks allowed), and every wrong one becomes a trace:

    correct prefix | the model's error tokens | one BK per error token | correct continuation + eot

Where the error starts (the divergence). On the text: the first token of the model's resolved
completion whose text departs from the reference solution's (text_divergence), so the same text
written in other tokens (BPE: '1', '2' for '12') is no error. A trace has to resolve to the
reference (the one solution we can write the continuation of) in ids, so it keeps the reference's
ids up to the last token boundary the two texts share, and the error starts there.
With --divergence=step (default) the line where that happens must also hold a step that the task's
own step checker (task.steps) marks wrong, or no step at all (the '####' answer line): when the
line holds only valid steps the model took another valid route (countdown has many), and undoing
it would teach deletions that were not needed, so the sample is dropped. --divergence=token keeps
every divergence.

How long the error is. From the divergence to the end of its line (its newline included: the
model has written the whole step and can check it), at most --max_error tokens, never the
end-of-text token (nothing is ever written after it). A completion that diverges by stopping
early (end-of-text where the reference goes on) or by being cut off has nothing to delete and
is dropped.

The filter (notes 4.4, after Toolformer): a trace is kept only if backtracking makes the correct
continuation more likely than writing it straight after the error. With the shared context
c = prompt + correct prefix + error, and log-probs under the checkpoint's policy layout at T=1:
    gain = log p(BK^k, correction | c) - log p(correction | c)          (--filter_score=full)
    gain = log p(correction | c, BK^k) - log p(correction | c)          (--filter_score=correction)
and the trace is kept when gain > --filter_threshold (nats, summed over the tokens). `full`
charges the backtracks themselves, so it keeps errors whose undoing the model already finds
cheaper than carrying on; `correction` is Toolformer's own form (the call is free, only its
effect on the continuation counts). On arith both keep nearly every real error (517 and 531 of
531 on the default model): the correct continuation written straight after a wrong line is far
less likely than any backtrack, so there the threshold is the knob.

DPO pairs come from the same kept data: shared prompt + prefix + error, chosen = BKs + correction,
rejected = the rest of the model's own completion after the error. Such pairs only ever say "after
an error, backtrack"; nothing in them says "after a correct line, do not", and DPO on them alone
learns to backtrack after every line (on the default arith model, accuracy at T=1 fell from 0.73 to
0.45). So by default (--needless_pairs) the samples also give the other side: at the first BK that
deleted a token of a correct prefix, shared = prompt + that correct prefix, chosen = the rest of the
reference, rejected = the model's own actions from that BK on. Each pair records its kind
(backtrack | needless).

Where the error is, by rollouts (--locate=rollouts; OmegaPRM, Luo et al. 2024). The reference is
one solution of many, and on a task like GSM8K a model's right route rarely spells it. Here the
first wrong step (line) of a wrong completion is found by asking the model itself: from the prefix
holding its first i steps, --rollouts continuations are sampled (backtracks allowed inside a
continuation, never into the prefix: that is the prompt now). If any reaches a verified answer, the
first i steps can still be completed right, so the first error lies later. Prefix 0 (the problem
alone) must be solvable, or the sample is dropped ('unsolved'); all M steps are wrong by definition
(a finished completion with a well-formed answer line that is wrong; others are not searched:
'cut_off', 'no_answer'), so a binary search finds the first step after which no rollout succeeds in
1 + ceil(log2 M) checks, all open searches advancing one check per batched generate call. The trace
is: the model's own steps before it, the wrong step from the first token where it departs from
a successful rollout's continuation of the last good prefix (at most --max_error tokens, else
'long_step'; the opening both share is kept, since slot bans forbid rewriting a deleted token at
its slot), one BK per deleted token, and the rest of that continuation: it resolves to a verified
solution. The search assumes that a step
after the first error never makes the solution completable again; a rollout that misses a rare
good continuation moves the located error earlier, so --rollouts trades tokens for accuracy, and
--rollout_budget caps the tokens one search may spend ('over_budget'; checked after each round,
so a search may overrun it by one round). DPO pairs reject the rest of the model's completion after
the wrong step. Each located search also writes its process labels
(--labels_out): the step ends, the located first error, the share of successful rollouts of every
prefix checked and, on the synthetic tasks (every line a checked step), the checker's own first
wrong step; the stats report how often the two agree (over the located errors the checker can
judge) and what the search cost in generated tokens. A model with a verifier head is also read as
a process reward model there, on the searched samples: the share of their right steps (before the
checker's first wrong one) and of their wrong steps (from it on) that it flags (p > 0.5 at the
step's end), and its mean p on each.
"""
import json
import os
import sys
import time
from dataclasses import dataclass, asdict

import torch

from checkpoint import load_model
from common import cli, configure, parse_kwargs, step_seed
from data import Rule, RuleFlags, Trace, completion_batch, resolve
from decode import generate
from model import completion_logprobs
from reward import step_bounds, step_wrong_probs, text_of
from tasks import SyntheticTask, checkpoint_task, prompt_ids


@dataclass
class Config(RuleFlags):   # --policy, --slot_bans, --max_retries: the checkpoint's unless given (data.RuleFlags)
    ckpt: str = "out/sft"
    task: str = ""                   # default: the checkpoint's task (and its settings)
    task_kwargs: str = ""
    chat: bool = True                # prompts in the checkpoint's chat template when it has one; False: plain
    n: int = 500                     # TRAIN problems to sample
    samples: int = 4                 # completions per problem
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 0          # 0 = the checkpoint's
    max_backtracks: int = -1         # cap while sampling (-1: none; 0: no backtracks, the raw errors)
    locate: str = "reference"        # reference | rollouts: where the first error is (see the docstring)
    divergence: str = "step"         # step | token (see the docstring; locate=reference)
    max_error: int = 0               # K: at most this many error tokens (and BKs) per trace; 0 = 8 by reference, 32 by rollouts
    rollouts: int = 4                # continuations sampled from each checked prefix (locate=rollouts)
    rollout_budget: int = 0          # at most this many generated tokens per search; 0 = no limit
    labels_out: str = ""             # process labels (locate=rollouts); "" = next to --out, 'traces' -> 'labels' in the name
    needless_pairs: bool = True         # also DPO pairs against the model's needless deletions (see the docstring)
    filter: bool = True
    filter_score: str = "full"       # full | correction (see the docstring)
    filter_threshold: float = 0.0    # keep a trace when gain > this (nats)
    out: str = "out/self_traces.jsonl"
    pairs_out: str = ""              # DPO pairs; "" = next to --out, 'traces' -> 'pairs' in the name
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"

# -----------------------------------------------------------------------------
# from a wrong completion to a trace, in ids


def text_divergence(tok, resolved, reference):
    """Where the model's resolved completion departs from the reference, read on the text (bytes):
    a BPE model can write the reference's text in other tokens ('1', '2' where the reference has
    '12'), and that is no error. End-of-text matches only end-of-text, after the whole reference.

    Returns (m, j, k): m, the index of the model's first token whose text departs (len(resolved)
    when none does: the completion spells a prefix of the reference, or all of it and then ends);
    and the latest token boundary the two share at or before that point: reference[:j] and
    resolved[:k] spell the same text (j = k = 0 at worst, the start of the response)."""
    eot = tok.eot_id
    ref_ends, off = {0: 0}, 0          # byte offset where a reference token ends -> tokens so far
    for i, t in enumerate(reference):
        if t == eot:
            break
        off += len(tok.token_bytes(t))
        ref_ends[off] = i + 1
    ref_text = b"".join(tok.token_bytes(t) for t in reference[:ref_ends[off]])
    off, j, k = 0, 0, 0
    for m, t in enumerate(resolved):
        if off in ref_ends:            # a boundary in both tokenizations
            j, k = ref_ends[off], m
        if t == eot:
            return (len(resolved) if off == len(ref_text) else m), j, k
        b = tok.token_bytes(t)
        if ref_text[off:off + len(b)] != b:
            return m, j, k
        off += len(b)
    return len(resolved), j, k


def line_end(resolved, d, eot_id, is_newline):
    """End (exclusive) of the line holding position d: just past its newline, or at end-of-text or
    the end of the completion."""
    e = d
    while e < len(resolved) and resolved[e] != eot_id:
        e += 1
        if is_newline(resolved[e - 1]):
            break
    return e


def line_is_wrong(tok, task, p, resolved, d, e):
    """Step check of the line resolved[..d..e) that holds the divergence d: False when it holds only
    steps the task calls valid (another route, not an error); True when a step is wrong or there is none."""
    start = d
    while start > 0 and b"\n" not in tok.token_bytes(resolved[start - 1]):
        start -= 1
    before = task.steps(tok.decode(resolved[:start]), p)
    through = task.steps(tok.decode(resolved[:e]), p)
    # the checks the line adds or changes: most tasks check each line written, so the line appends
    # its checks; arith checks each required step (a missing one fails), so a valid line turns its
    # step's failed check into a pass and a wrong one changes nothing
    new = [ok for i, ok in enumerate(through) if i >= len(before) or ok != before[i]]
    return not new or not all(new)


def candidate(tok, task, p, prompt, resolved, cfg):
    """A wrong completion -> (candidate dict, None) or (None, reason it is unusable).

    The divergence is found on the text (text_divergence), so a completion that spells the
    reference, or a prefix of it, in other tokens is never an error ('correct', 'cut_off'). The
    trace keeps the reference's ids up to the last token boundary both share before the departure,
    then the model's own tokens from there to the end of the departing line (at most max_error), as
    many BKs, and the rest of the reference: it resolves exactly to tok.encode(solution) + [eot].
    The deleted tokens may begin with a few correct bytes when the departing token starts inside a
    reference token ('1' '9' against '18': both are deleted), but never a correct line: where the
    shared boundary lies before the departing line, or more than max_error tokens back, the
    completion is dropped ('no_boundary')."""
    eot = tok.eot_id
    reference = tok.encode(p["solution"]) + [eot]
    m, j, k = text_divergence(tok, resolved, reference)
    if m == len(resolved):
        # the reference's text, or a prefix of it: nothing written to delete
        return None, ("correct" if resolved and resolved[-1] == eot else "cut_off")
    if resolved[m] == eot:
        return None, "ended_early"       # ending is the error; an end-of-text is never deleted
    # correct text the deletion would take with it: from the shared boundary to where token m departs
    ref_text = b"".join(tok.token_bytes(t) for t in reference[:-1])
    start = sum(len(tok.token_bytes(t)) for t in resolved[:k])
    end = sum(len(tok.token_bytes(t)) for t in resolved[:m])
    b = tok.token_bytes(resolved[m])
    while b and ref_text[end:end + 1] == b[:1]:      # the departing token's own correct bytes
        end, b = end + 1, b[1:]
    if b"\n" in ref_text[start:end] or m - k >= cfg.max_error:
        return None, "no_boundary"
    # the error runs to the end of its line (the model has written the whole step and can check
    # it), at most max_error tokens; never the end-of-text token, after which nothing is written
    e = line_end(resolved, m, eot, lambda t: b"\n" in tok.token_bytes(t))
    err = resolved[k:min(e, k + cfg.max_error)]
    if cfg.divergence == "step" and not line_is_wrong(tok, task, p, resolved, m, e):
        return None, "valid_step"
    prefix = reference[:j]
    c = dict(prompt=prompt, prefix=prefix + err, n_err=len(err), correction=reference[j:],
             rejected=resolved[k + len(err):], reference=reference, question=p["question"])
    c["response"] = prefix + err + [tok.bk_id] * len(err) + c["correction"]
    assert resolve(c["response"], tok.bk_id) == reference, "a self-error trace must resolve to the reference"
    return c, None


# -----------------------------------------------------------------------------
# the first wrong step, located by rollouts (see the docstring)


def locate_first_errors(searches, sample, wins, rollouts, budget=0):
    """OmegaPRM's binary search, for many searches at once. A search is a dict with prompt, resolved
    and bounds (step_bounds); on return it holds `end` (located | unsolved | over_budget) and, when
    located, `first` (the 1-based index of its first wrong step) and `good` (a winning continuation
    of the prefix before it), plus `values` (prefix -> share of winning rollouts), `tokens` (actions
    generated) and `checks`. sample(prompts) -> generate-like outputs (response, resolved);
    wins(search, ids) -> whether the prefix + continuation ids are a right, finished solution."""
    for s in searches:
        assert len(s["bounds"]) >= 2, "a search needs at least one step"
        s.update(lo=0, hi=len(s["bounds"]) - 1, at=0, values={}, tokens=0, checks=0, end=None)
    active = list(searches)
    while active:
        outs = sample([s["prompt"] + s["resolved"][:s["bounds"][s["at"]]] for s in active for _ in range(rollouts)])
        still = []
        for j, s in enumerate(active):
            prefix = s["resolved"][:s["bounds"][s["at"]]]
            conts = outs[j * rollouts:(j + 1) * rollouts]
            s["tokens"] += sum(len(o["response"]) for o in conts)
            s["checks"] += 1
            good = [o["resolved"] for o in conts if wins(s, prefix + o["resolved"])]
            s["values"][s["at"]] = len(good) / rollouts
            if good:
                s["lo"], s["good"] = s["at"], good[0]
            elif s["at"] == 0:
                s["end"] = "unsolved"   # not even the problem alone: nothing to locate against
                continue
            else:
                s["hi"] = s["at"]
            if s["hi"] - s["lo"] == 1:
                s["end"], s["first"] = "located", s["hi"]
            elif budget and s["tokens"] >= budget:
                s["end"] = "over_budget"
            else:
                s["at"] = (s["lo"] + s["hi"]) // 2
                still.append(s)
        active = still
    return searches


def solves(tok, task, p, ids):
    """Whether resolved response ids are a finished (a stop token ends them), verified solution of p."""
    return bool(ids) and ids[-1] in tok.stop_ids and task.verify(text_of(tok, ids), p)


def unsearchable(tok, task, resolved):
    """Why a wrong completion cannot be searched (None when it can). The search takes the whole
    completion to be wrong; that holds only for a finished one whose answer line is well formed, so
    that some step of it is wrong. One that stops before its answer may have none."""
    if len(step_bounds(tok, resolved)) < 2:
        return "ended_early"       # no step written: nothing to delete
    if resolved[-1] not in tok.stop_ids:
        return "cut_off"           # unfinished, so not known to be wrong
    if not task.well_formed(text_of(tok, resolved)):
        return "no_answer"         # every step may be right, only the answer missing
    return None


def checker_first_error(tok, task, p, resolved, bounds):
    """The first step (1-based) the task's step checks call wrong (line_is_wrong), or None. Only on
    the synthetic tasks, where every line is a checked step: on GSM8K a line of prose holds no
    checked step and would count as wrong."""
    if not isinstance(task, SyntheticTask):
        return None
    for i in range(1, len(bounds)):
        if line_is_wrong(tok, task, p, resolved, bounds[i - 1], bounds[i]):
            return i
    return None


def located_candidate(tok, s, max_error):
    """A located search -> (candidate dict as candidate() makes, None) or (None, reason)."""
    b, i = s["bounds"], s["first"]
    step, good = s["resolved"][b[i - 1]:b[i]], s["good"]
    # the wrong step's opening tokens that the winning continuation writes too stay: deleting and
    # rewriting a token at its own slot is what slot bans forbid (docs/backtrack-semantics.md §4)
    k = 0
    while k < len(step) and k < len(good) and step[k] == good[k]:
        k += 1
    if k == len(step):
        return None, "noisy"       # a winning rollout wrote the located step itself: sampling noise
    if len(step) - k > max_error:
        return None, "long_step"
    prefix, err = s["resolved"][:b[i - 1]] + step[:k], step[k:]
    c = dict(prompt=s["prompt"], prefix=prefix + err, n_err=len(err), correction=good[k:],
             rejected=s["resolved"][b[i]:], reference=prefix + good[k:], question=s["p"]["question"])
    c["response"] = prefix + err + [tok.bk_id] * len(err) + c["correction"]
    assert resolve(c["response"], tok.bk_id) == c["reference"]
    return c, None


def locate(model, tok, task, searches, rule, cfg, cap, max_new_tokens, stats):
    """Run the rollout searches with the model's own sampler; fill `stats` (counts, agreement with
    the step checker, token cost) and return one process-label row per located search."""
    calls = [0]

    def sample(prompts):
        calls[0] += 1
        outs = []
        for i in range(0, len(prompts), cfg.batch_size):
            outs += generate(model, prompts[i:i + cfg.batch_size], max_new_tokens=max_new_tokens, rule=rule,
                             temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, max_backtracks=cap,
                             seed=step_seed(cfg.seed + 1, calls[0]) * (1 << 20) + i, stop_ids=tok.stop_ids)
        return outs

    locate_first_errors(searches, sample, lambda s, ids: solves(tok, task, s["p"], ids), cfg.rollouts,
                        cfg.rollout_budget)
    labels, agree, checked = [], 0, 0
    for s in searches:
        stats[s["end"]] = stats.get(s["end"], 0) + 1
        s["truth"] = truth = checker_first_error(tok, task, s["p"], s["resolved"], s["bounds"])
        if s["end"] != "located":
            continue
        if truth is not None:
            checked += 1
            agree += truth == s["first"]
        labels.append(dict(prompt=s["prompt"], response=s["resolved"], step_ends=s["bounds"][1:], first_error=s["first"],
                           values={str(k): v for k, v in sorted(s["values"].items())}, checker_first_error=truth,
                           question=s["p"]["question"]))
    if getattr(model, "verifier", None) is not None:   # the model's own head, read as a PRM, against the checker
        flags = {True: [], False: []}   # step wrong by the checker -> the head's p(wrong) at its end
        probs = step_wrong_probs(model, tok, [s["prompt"] for s in searches], [s["resolved"] for s in searches], rule,
                                 cfg.batch_size)
        for s, ps in zip(searches, probs):
            if s["truth"] is not None:   # steps before the first wrong one are right, the rest wrong
                for i, q in enumerate(ps, 1):
                    flags[i >= s["truth"]].append(q)
        for k, v in (("right", flags[False]), ("wrong", flags[True])):
            stats[f"head_flags_{k}_steps"] = sum(q > 0.5 for q in v) / len(v) if v else None
            stats[f"head_p_{k}_steps"] = sum(v) / len(v) if v else None
    spent = sum(s["tokens"] for s in searches)
    stats.update(searched=len(searches), rollout_tokens=spent, rollout_checks=sum(s["checks"] for s in searches),
                 tokens_per_search=spent / max(len(searches), 1), tokens_per_located=spent / max(len(labels), 1),
                 checker_checked=checked, checker_agree=agree / checked if checked else None)
    return labels


def needless_deletion(response, reference, bk_id):
    """The first BK of a sampled response that deletes a token of a correct prefix (the surviving
    tokens are a prefix of the reference): (j, k), j the length of that prefix and k the index of
    the BK in the response. None when every deletion removed a wrong token."""
    stack = []
    for k, t in enumerate(response):
        if t != bk_id:
            stack.append(t)
        elif stack:
            if stack == reference[:len(stack)]:
                return len(stack), k
            stack.pop()
    return None

# -----------------------------------------------------------------------------
# the Toolformer-style filter


@torch.no_grad()
def backtrack_gain(model, cands, bk_id, rule, score="full", batch_size=64):
    """gain per candidate (see the docstring): log p(with backtracks) - log p(straight on), both
    over the completion after the shared context prompt + prefix + error."""
    assert score in ("full", "correction"), f"filter_score must be full | correction, not {score!r}"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gains = []
    for s in range(0, len(cands), batch_size):
        part = cands[s:s + batch_size]
        traces, starts = [], []
        for c in part:  # with backtracks (the trace itself), then straight on after the error
            k = 0 if score == "full" else c["n_err"]
            traces.append(Trace(c["prompt"], c["prefix"] + [bk_id] * c["n_err"] + c["correction"]))
            starts.append(len(c["prefix"]) + k)
        for c in part:
            traces.append(Trace(c["prompt"], c["prefix"] + c["correction"]))
            starts.append(len(c["prefix"]))
        lp = completion_logprobs(model, completion_batch(traces, starts, bk_id, rule, device=device))
        gains.append(lp[:len(part)] - lp[len(part):])
    model.train(was_training)
    return torch.cat(gains).tolist() if gains else []


def apply_filter(model, cands, bk_id, rule, score="full", threshold=0.0, batch_size=64):
    """The candidates whose gain > threshold; every candidate gets its 'gain'."""
    for c, g in zip(cands, backtrack_gain(model, cands, bk_id, rule, score, batch_size)):
        c["gain"] = g
    return [c for c in cands if c["gain"] > threshold]

# -----------------------------------------------------------------------------


def pairs_path(out, kind="pairs"):
    """The file beside --out for `kind` (pairs | labels): 'traces' -> kind in its name, or a suffix."""
    d, b = os.path.split(out)
    root, ext = os.path.splitext(b)
    return os.path.join(d, b.replace("traces", kind) if "traces" in b else root + "_" + kind + (ext or ".jsonl"))


def check_args(cfg):
    """Every argument, before any work: one line naming the bad one."""
    if cfg.divergence not in ("step", "token") or cfg.filter_score not in ("full", "correction"):
        raise ValueError(f"--divergence={cfg.divergence} --filter_score={cfg.filter_score}: expected step|token and "
                         "full|correction")
    if cfg.locate not in ("reference", "rollouts"):
        raise ValueError(f"--locate={cfg.locate}: expected reference | rollouts")
    if cfg.max_error == 0:   # a located error runs to its step's end from where a winning rollout departs
        cfg.max_error = 8 if cfg.locate == "reference" else 32
    if cfg.rollout_budget < 0:
        raise ValueError(f"--rollout_budget={cfg.rollout_budget}: must be at least 0 (0: no limit)")
    for k in ("n", "samples", "batch_size", "max_error", "rollouts"):
        if getattr(cfg, k) < 1:
            raise ValueError(f"--{k}={getattr(cfg, k)}: must be at least 1")
    if cfg.temperature <= 0 or not 0 < cfg.top_p <= 1:
        raise ValueError(f"--temperature={cfg.temperature} --top_p={cfg.top_p}: sampling needs T > 0 and 0 < top_p <= 1")
    Rule.from_flags(cfg)   # the decoding-rule flags parse
    if not os.path.isfile(os.path.join(cfg.ckpt, "config.json")):
        raise SystemExit(f"error: no checkpoint at --ckpt={cfg.ckpt!r}")


class Collected:
    """What the samples yield: candidate traces (each written once), DPO pairs against needless
    deletions, the searches to run (--locate=rollouts), and the counts of why a sample gave none."""

    def __init__(self, block_size):
        self.block_size = block_size
        self.cands, self.needless, self.searches = [], [], []
        self.seen, self.searched = set(), set()
        self.stats = dict(samples=0, correct=0, wrong=0)

    def count(self, why):
        self.stats[why] = self.stats.get(why, 0) + 1

    def add(self, c, why):
        """A candidate trace, unless it is unusable (why), too long or sampled before."""
        if c is None:
            return self.count(why)
        if len(c["prompt"]) + len(c["response"]) > self.block_size:
            return self.count("too_long")
        key = (tuple(c["prompt"]), tuple(c["prefix"]), tuple(c["rejected"]))
        if key in self.seen:  # the same error and continuation sampled twice: write it once
            return self.count("duplicate")
        self.seen.add(key)
        self.cands.append(c)

    def add_needless(self, tok, p, prompt, response):
        """Correct or not, a sample may have deleted a correct token: a pair prefers the reference."""
        reference = tok.encode(p["solution"]) + [tok.eot_id]
        hit = needless_deletion(response, reference, tok.bk_id)
        if hit is None:
            return
        j, k = hit
        q = dict(prompt=prompt, prefix=reference[:j], chosen=reference[j:], rejected=response[k:],
                 question=p["question"], kind="needless")
        key = (tuple(prompt), tuple(q["prefix"]), tuple(q["rejected"]))
        if key not in self.seen and len(prompt) + j + max(len(q["chosen"]), len(q["rejected"])) <= self.block_size:
            self.seen.add(key)
            self.needless.append(q)

    def add_search(self, tok, task, p, prompt, resolved):
        """A wrong sample to locate by rollouts, unless it cannot be searched or was searched already."""
        why = unsearchable(tok, task, resolved)
        if why:
            self.count(why)
        elif (tuple(prompt), tuple(resolved)) in self.searched:
            self.count("duplicate_sample")   # the same wrong completion sampled twice: searched once
        else:
            self.searched.add((tuple(prompt), tuple(resolved)))
            self.searches.append(dict(p=p, prompt=prompt, resolved=resolved, bounds=step_bounds(tok, resolved)))


def write_outputs(cfg, tok, kept, needless, labels):
    """The traces (one per distinct trace), the DPO pairs and, by rollouts, the process labels.
    Returns (traces written, backtrack pairs written, the pairs file, the labels file or None)."""
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    pairs_out = cfg.pairs_out or pairs_path(cfg.out)
    labels_out = None
    if cfg.locate == "rollouts":
        labels_out = cfg.labels_out or pairs_path(cfg.out, "labels")
        with open(labels_out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in labels)
    written = set()
    n_traces = n_pairs = 0
    with open(cfg.out, "w") as ft, open(pairs_out, "w") as fp:
        for c in kept:
            m = dict(question=c["question"], n_err=c["n_err"], gain=c.get("gain"))
            tkey = (tuple(c["prompt"]), tuple(c["response"]))
            if tkey not in written:  # several continuations of one error: one trace, several pairs
                written.add(tkey)
                ft.write(json.dumps(dict(prompt=c["prompt"], response=c["response"], meta=m)) + "\n")
                n_traces += 1
            if c["rejected"]:  # an error at the very end has no continuation to prefer against
                fp.write(json.dumps(dict(prompt=c["prompt"], prefix=c["prefix"],
                                         chosen=[tok.bk_id] * c["n_err"] + c["correction"],
                                         rejected=c["rejected"], kind="backtrack", **m)) + "\n")
                n_pairs += 1
        for q in needless:
            fp.write(json.dumps(q) + "\n")
    return n_traces, n_pairs, pairs_out, labels_out


def main(argv=None):
    cfg = Config()
    configure(cfg, sys.argv[1:] if argv is None else argv)
    check_args(cfg)
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.ckpt, device=cfg.device, chat=cfg.chat)
    meta = model.meta
    task_name, task_kwargs, task = checkpoint_task(meta, cfg.task,
                                                   parse_kwargs(cfg.task_kwargs) if cfg.task_kwargs else None)
    rule = Rule.from_flags(cfg, meta)
    max_new_tokens = cfg.max_new_tokens or meta.get("max_new_tokens", 128)
    problems = task.problems("train", n=cfg.n, seed=cfg.seed)
    task.check_train(problems)  # the model's errors on test problems must never become training data
    print(f"{cfg.ckpt} | task={task_name} {rule} | {len(problems)} train problems x {cfg.samples} samples "
          f"at T={cfg.temperature}")

    t0 = time.time()
    jobs = [(p, prompt_ids(tok, task, p)) for p in problems for _ in range(cfg.samples)]
    got = Collected(model.config.block_size)
    stats = got.stats
    stats["samples"] = len(jobs)
    cap = None if cfg.max_backtracks < 0 else cfg.max_backtracks
    for s in range(0, len(jobs), cfg.batch_size):
        part = jobs[s:s + cfg.batch_size]
        outs = generate(model, [q for _, q in part], max_new_tokens=max_new_tokens, rule=rule,
                        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, max_backtracks=cap,
                        seed=step_seed(cfg.seed, s), stop_ids=tok.stop_ids)
        for (p, prompt), o in zip(part, outs):
            if cfg.needless_pairs:
                got.add_needless(tok, p, prompt, o["response"])
            if task.verify(text_of(tok, o["resolved"]), p):
                stats["correct"] += 1
            elif cfg.locate == "rollouts":
                stats["wrong"] += 1
                got.add_search(tok, task, p, prompt, o["resolved"])
            else:
                stats["wrong"] += 1
                got.add(*candidate(tok, task, p, prompt, o["resolved"], cfg))
    labels = []
    if cfg.locate == "rollouts":
        labels = locate(model, tok, task, got.searches, rule, cfg, cap, max_new_tokens, stats)
        for s in got.searches:
            if s["end"] == "located":
                got.add(*located_candidate(tok, s, cfg.max_error))
    stats["candidates"] = len(got.cands)
    kept = got.cands
    if cfg.filter:
        kept = apply_filter(model, got.cands, tok.bk_id, rule, cfg.filter_score, cfg.filter_threshold, cfg.batch_size)
        gains = sorted(c["gain"] for c in got.cands)
        if gains:
            stats["gain_median"] = gains[len(gains) // 2]
    stats["kept"] = len(kept)
    n_traces, n_pairs, pairs_out, labels_out = write_outputs(cfg, tok, kept, got.needless, labels)
    stats.update(traces=n_traces, pairs=n_pairs, needless_pairs=len(got.needless), seconds=round(time.time() - t0, 1))
    print(json.dumps(stats))
    print(f"wrote {n_traces} traces to {cfg.out} and {n_pairs + len(got.needless)} DPO pairs to {pairs_out}"
          + (f"; {len(labels)} process labels to {labels_out}" if labels_out else ""))
    with open(os.path.splitext(cfg.out)[0] + ".stats.json", "w") as f:
        json.dump(dict(config=asdict(cfg), **stats), f, indent=1)
    return stats


if __name__ == "__main__":
    cli(main)
