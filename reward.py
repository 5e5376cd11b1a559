"""
Rewards for RL on backtrack traces (research notes, section 6). Their curricula (7.3, 7.4) are in schedules.py.

Every component is computed on the RESOLVED completion (resolve() applied, end-of-text dropped)
with the task's own verifier (which reads the answer through tasks/answers.py's parse_answer, as evaluation does):
a completion is scored on what it finally says, never on token overlap with a reference, and
never against an unresolved target.

Components (each returned, for logging, next to the weighted total):
- outcome: 1 if task.verify(resolved text) holds; otherwise the task's partial credit where it
  defines one (task.partial_credit(text, problem) -> [0, 1)), else 0.
- process: share of the task's per-step checks (task.steps) that pass on the resolved text;
  0 when no step is written. Tasks without step checks score 0 for every completion, so the
  component then moves nothing.
- backtrack: how well backtracks were used, by comparing a DRAFT (below) with the final text:
      no backtrack, final right            +clean_bonus
      no backtrack, final wrong             0
      more backtracks than the budget      -cap_penalty (whatever else happened)
      draft already right                  -unnecessary_penalty * n_bk
      draft wrong, final right             +correction_bonus / sqrt(n_bk)      (a successful correction)
      draft wrong, final wrong             -failed_penalty                      (a failed correction)
  "right" means the verifier accepts the text and every step check passes, and there is at least
  one check (an empty list is not "every step right"). Step checks are per REQUIRED step where the
  task knows them (arith: a skipped step is a failed check, an extra line fails one of its own), so
  a completion that skips steps, repeats lines or hedges its answer never ties the clean solution.
  correction_bonus < clean_bonus on purpose: a correction beats not correcting, but writing a
  deliberate error just to fix it never beats answering right the first time (else "always
  backtrack" is a reward hack).
  With a process reward model (train_grpo.py --prm), the component is the model's instead: see
  prm_process_score below.
- format: half for ending with end-of-text (not truncated), half for a well-formed answer
  (task.well_formed: exactly one '####' line, the last, with a parseable number), so a hedged
  answer (`#### 17\n#### 18`) or text after the answer never earns the whole format credit.

The draft (the "pre-backtrack text"), precisely: let `pre` be the response tokens before the
first BK (all normal tokens: the text as first written, up to where the model first changed its
mind) and `final` the resolved response. draft = pre + final[len(pre):], i.e. the first draft,
continued by whatever the final text says from that length on. So a slip fixed in place
(`3+5=9 BK 8 ...`) has the draft `3+5=9 ...` (wrong) and the final `3+5=8 ...`; a backtrack that
deletes a right token and writes it again (`8 BK 8`, possible under `keep`) has draft == final;
a completion deleted entirely has draft == pre. This is a counterfactual "what if the first
backtrack had not happened", cheap and exact in ids; it is aligned when a correction has the
length of what it replaced, and when it is not, the draft is garbled, which the verifier reads as
wrong (the first draft was being rewritten, so it was at least not the final answer).
The plain alternative, "everything ever written" (the raw completion with BKs dropped), scores a
no-op `8 BK 8` as a correction (`88` is wrong), which would pay the bonus for pointless backtracks.
"""
import math
from dataclasses import dataclass

import torch

from data import Trace, completion_batch, count_backtracks, resolve
from model import action_logits

COMPONENTS = ("outcome", "process", "backtrack", "format")


@dataclass
class RewardConfig:
    clean_bonus: float = 1.0          # backtrack component of a right answer written without backtracks
    correction_bonus: float = 0.5     # a successful correction earns this / sqrt(n_bk); keep < clean_bonus
    unnecessary_penalty: float = 0.2  # per backtrack, when the draft was already right
    failed_penalty: float = 0.2       # backtracked, and still wrong
    cap_penalty: float = 1.0          # more backtracks than the budget allows

    def __post_init__(self):
        assert self.correction_bonus < self.clean_bonus, \
            "correction_bonus must stay below clean_bonus, or deliberate error + fix beats a clean answer"


def text_of(tok, ids):
    """Decoded text of response ids, without end tokens (any of the tokenizer's stop ids)."""
    return tok.decode([t for t in ids if t not in tok.stop_ids])


def outcome_score(task, text, problem):
    if task.verify(text, problem):
        return 1.0
    partial = getattr(task, "partial_credit", None)
    return float(min(max(partial(text, problem), 0.0), 1.0)) if partial is not None else 0.0


def process_score(task, text, problem):
    checks = task.steps(text, problem)
    return sum(map(bool, checks)) / len(checks) if checks else 0.0


def is_right(task, text, problem):
    """The answer verifies and every step check passes (the criterion drafts are judged by). An
    empty list of checks is not "every step right": `all([])` would give the answer line alone
    (`#### 18`) the clean bonus, so no checks means not right."""
    checks = task.steps(text, problem)
    return bool(task.verify(text, problem)) and len(checks) > 0 and all(checks)


def draft_ids(response, bk_id):
    """The pre-backtrack text of a response, in ids (see the module docstring)."""
    if bk_id not in response:
        return resolve(response, bk_id)
    pre = response[:response.index(bk_id)]
    final = resolve(response, bk_id)
    return pre + final[len(pre):]


def backtrack_score(n_bk, draft_right, final_right, budget, rc):
    if budget is not None and n_bk > budget:
        return -rc.cap_penalty
    if n_bk == 0:
        return rc.clean_bonus if final_right else 0.0
    if draft_right:
        return -rc.unnecessary_penalty * n_bk
    if final_right:
        return rc.correction_bonus / math.sqrt(n_bk)
    return -rc.failed_penalty


def score(task, tok, problem, response, budget=None, rc=None, process=None):
    """Reward components of one completion. response: the raw action ids (BKs included, ending in
    end-of-text unless truncated). budget: the backtrack budget in force (None = no cap).
    process: the process component from a process reward model (prm_process_score); None = the
    task's step checks. Returns a dict: the four COMPONENTS plus facts for logging (n_bk, right,
    draft_right, ...; `process_rule`, the step checks' share, whichever gives the component)."""
    rc = rc or RewardConfig()
    bk = tok.bk_id
    final = resolve(response, bk)
    text = text_of(tok, final)
    n_bk = count_backtracks(response, bk)
    right = is_right(task, text, problem)
    draft_right = right if n_bk == 0 else is_right(task, text_of(tok, draft_ids(response, bk)), problem)
    ended = len(final) > 0 and final[-1] in tok.stop_ids
    rule = process_score(task, text, problem)
    return dict(
        outcome=outcome_score(task, text, problem),
        process=rule if process is None else process,
        process_rule=rule,
        backtrack=backtrack_score(n_bk, draft_right, right, budget, rc),
        format=0.5 * ended + 0.5 * bool(task.well_formed(text)),
        n_bk=n_bk, right=right, draft_right=draft_right, ended=ended,
        over_budget=budget is not None and n_bk > budget,
        fixed=n_bk > 0 and not draft_right and right,          # a successful correction
        failed=n_bk > 0 and not draft_right and not right,     # backtracked, still wrong
        unnecessary=n_bk > 0 and draft_right,                  # backtracked a draft that was right
    )


def deletion_stats(response, reference, bk_id):
    """Judge each deletion of a completion against the task's reference solution (ids).

    A token x written on top of surviving prefix S is wrong iff S + [x] is not a prefix of the
    reference (it diverged, or sits on a path that already had). Deleting a wrong token is a
    necessary deletion; deleting a right one is unnecessary. Tasks with several valid solutions
    (countdown, gsm8k) are judged against their one reference, so there `unnecessary` is an upper
    bound. Evaluation reports these; the reward's backtrack component judges drafts instead (above).
    Returns (necessary, unnecessary)."""
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


# -----------------------------------------------------------------------------
# a process reward model: a verifier head (model.add_verifier) scoring each step


def step_bounds(tok, resolved):
    """[0, end of step 1, ..., end of step M] in a resolved response: resolved[:b[i]] holds its first
    i steps (lines, each with its newline; the last may have none). The final stop token is no step."""
    n = len(resolved) - (1 if resolved and resolved[-1] in tok.stop_ids else 0)
    b = [0] + [i + 1 for i in range(n) if b"\n" in tok.token_bytes(resolved[i])]
    return b if b[-1] == n else b + [n]


def step_ends(tok, resolved):
    """The step ends (step_bounds) a PRM can score: a step is scored at the action that follows it,
    where the head reads its last token as the top of the stack. The answer line ends at the final
    stop token, whose action reads it; a line at the end of a truncated response has no such action
    and is not scored."""
    return [e for e in step_bounds(tok, resolved)[1:] if e < len(resolved)]


@torch.no_grad()
def step_wrong_probs(prm, tok, prompts, resolved, rule, batch_size=64):
    """The head's probability that each step is wrong, per response: at each step end (step_ends),
    p(the last surviving token is an error), from one teacher-forced forward over prompt + resolved
    response (no BKs: both policies lay it out alike). Returns a list of lists."""
    device = next(prm.parameters()).device
    out = []
    for s in range(0, len(prompts), batch_size):
        part = list(zip(prompts[s:s + batch_size], resolved[s:s + batch_size]))
        batch = completion_batch([Trace(q, r) for q, r in part], [0] * len(part), tok.bk_id, rule, device=device)
        _, v = action_logits(prm, batch, verify=True)
        p = torch.sigmoid(v.float()).tolist()
        first = 0   # actions are laid out row after row, one per response token
        for _, r in part:
            out.append([p[first + e] for e in step_ends(tok, r)])
            first += len(r)
    return out


def prm_process_score(probs, threshold=0.5):
    """The process component from a process reward model's step probabilities (of being wrong):
        1 - sum over steps of max(p - threshold, 0) / (1 - threshold), floored at 0.
    A step the PRM passes (p <= threshold) costs nothing and one it flags costs up to 1: the score
    can only fall as steps are added (the "clip" form of Gao et al. 2024, "On designing effective
    RL reward at training time for LLM reasoning"). A mean of step scores instead would pay for
    padding a solution with easy steps, and a PRM can be gamed where a rule cannot. With it the
    clean solution keeps the top process score whenever the PRM passes its steps, so it still
    strictly beats every shortcut (tests/test_reward.py: the other components order them); a PRM
    that flags a right step makes the clean solution lose that much, which no reward can prevent.
    A response with no finished step scores 1 here (nothing flagged); the other components keep
    it below the clean solution (the same table: the empty, truncated and answer-only rows)."""
    return max(0.0, 1.0 - sum(max(p - threshold, 0.0) for p in probs) / (1.0 - threshold))


def total(components, weights):
    """The weighted sum of the components (weights: name -> float)."""
    return sum(weights.get(k, 0.0) * components[k] for k in COMPONENTS)
