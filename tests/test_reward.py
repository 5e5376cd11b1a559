"""Rewards cannot be gamed by shortcuts: on arith and countdown the clean, complete solution scores
strictly highest (reward.total under train_grpo's default weights and RewardConfig, and the 'notes'
schedule) against skipped steps, hedged or repeated answers, repeated lines, a solution written
twice, an error fixed with BK, BK spam, a wrong answer, an empty and a truncated completion; and the
step checks, well-formedness and "every step right" rule behind that."""
import pytest

import train_grpo
from reward import RewardConfig, is_right, prm_process_score, score, total
from schedules import WeightSchedule
from tasks import Task, get_task
from tokenizer import get_tokenizer

TOK = get_tokenizer("byte")
BK, EOT = TOK.bk_id, TOK.eot_id
ARITH = get_task("arith")
COUNTDOWN = get_task("countdown")
P = ARITH.problem([7, 5, 6], ["+", "+"])    # 7+5=12 / 12+6=18 / #### 18
CD = dict(question="make 29 from 3 7 8", answer="29", nums=[3, 7, 8], target=29,
          solution="3*7=21\n21+8=29\n#### 29")
BUDGETS = (None, 8.0, 2.0)   # train_grpo's default 'exp' budget runs from 8 down to 2; None: no cap


def ids(text):
    return TOK.encode(text)


def trace(*parts):
    """Text pieces and BK markers ('<'), ending in end-of-text unless the last part is '|cut'."""
    out = []
    for x in parts:
        out += [] if x == "|cut" else [BK] if x == "<" else ids(x)
    return out if parts and parts[-1] == "|cut" else out + [EOT]


def default_rc():
    """The RewardConfig train_grpo builds from its Config defaults."""
    c = train_grpo.Config()
    return RewardConfig(c.clean_bonus, c.correction_bonus, c.unnecessary_penalty, c.failed_penalty, c.cap_penalty)


def all_weights():
    default = train_grpo.Config().reward_weights
    return [(default, 0.0)] + [("notes", t) for t in (0.0, 0.4, 0.9)]


def assert_clean_is_strictly_best(task, problem, rows, prm=(None,)):
    """prm: process components a process reward model may give a shortcut (None: the step checks).
    With a PRM the clean solution gets 1.0, the clip form's score when the PRM passes its steps
    (reward.prm_process_score); a shortcut may get anything, up to that same top score."""
    rc = default_rc()
    for schedule, t in all_weights():
        w = WeightSchedule.from_string(schedule).at(t)
        for budget in BUDGETS:
            for process in prm:
                clean = None if process is None else 1.0
                best = total(score(task, TOK, problem, rows["clean"], budget, rc, clean), w)
                for name, resp in rows.items():
                    if name == "clean":
                        continue
                    got = total(score(task, TOK, problem, resp, budget, rc, process), w)
                    assert got < best, (name, schedule, t, budget, process, got, best)


def arith_rows():
    clean = P["solution"]
    lines = clean.split("\n")
    return {
        "clean": trace(clean),
        "answer_only": trace("#### 18"),
        "skip_last_step": trace("7+5=12\n#### 18"),
        "skip_first_step": trace("12+6=18\n#### 18"),
        "hedged": trace("7+5=12\n12+6=18\n#### 17\n#### 18"),
        "hedged_other_order": trace("7+5=12\n12+6=18\n#### 18\n#### 17"),
        "answer_twice": trace(clean + "\n#### 18"),
        "two_answers_one_line": trace("7+5=12\n12+6=18\n#### 17 #### 18"),
        "step_after_answer": trace(clean + "\n12+6=18"),
        "repeated_line": trace("7+5=12\n7+5=12\n12+6=18\n#### 18"),
        "extra_step": trace("7+5=12\n12+6=18\n18+0=18\n#### 18"),
        "steps_twice_one_answer": trace("7+5=12\n12+6=18\n7+5=12\n12+6=18\n#### 18"),
        "solution_twice": trace(clean + "\n" + clean),
        "slip_fixed": trace("7+5=13", "<", "2\n12+6=18\n#### 18"),
        "slip_fixed_a_line_late": trace("7+5=13\n", "<", "<", "2\n12+6=18\n#### 18"),
        "bk_spam_on_empty": [BK] * 6 + trace(clean),
        "bk_spam_retype": trace(*[x for l in lines for x in (l, "<", l[-1], "\n")][:-1]),
        "bk_spam_garbage": trace(*[x for l in lines for x in (l, "x", "<", "\n")][:-1]),
        "bk_spam_answer_only": trace("#### 17", "<", "8"),
        "write_then_delete_all": ids(clean) + [BK] * len(ids(clean)) + [EOT],
        "wrong": trace("7+5=13\n13+6=19\n#### 19"),
        "wrong_answer_right_steps": trace("7+5=12\n12+6=18\n#### 19"),
        "failed_fix": trace("7+5=13", "<", "4\n14+6=20\n#### 20"),
        "empty": [EOT],
        "nothing": [],
        "truncated": trace(clean, "|cut"),
        "truncated_mid_step": trace("7+5=12\n12+6", "|cut"),
        "truncated_answer_only": trace("#### 18", "|cut"),
    }


def test_arith_clean_solution_strictly_beats_every_shortcut():
    assert_clean_is_strictly_best(ARITH, P, arith_rows())


def test_arith_shortcuts_fail_the_checks_they_skip():
    rows = arith_rows()
    c = score(ARITH, TOK, P, rows["clean"])
    assert (c["outcome"], c["process"], c["backtrack"], c["format"]) == (1.0, 1.0, 1.0, 1.0)
    # a skipped step is a failed check: half the process credit, and no clean bonus
    c = score(ARITH, TOK, P, rows["skip_last_step"])
    assert c["process"] == 0.5 and not c["right"] and c["backtrack"] == 0.0
    # the answer alone: one failed check per required step, never "every step right"
    c = score(ARITH, TOK, P, rows["answer_only"])
    assert c["process"] == 0.0 and not c["right"] and c["backtrack"] == 0.0
    # a second answer line, or anything after the answer, is not well formed: it does not verify
    # and gets only the end-of-text half of the format credit
    for name in ("hedged", "hedged_other_order", "answer_twice", "two_answers_one_line", "step_after_answer",
                 "solution_twice"):
        c = score(ARITH, TOK, P, rows[name])
        assert c["outcome"] == 0.0 and c["format"] == 0.5 and not c["right"], name
    # extra or repeated step lines fail a check each
    for name in ("repeated_line", "extra_step", "steps_twice_one_answer"):
        c = score(ARITH, TOK, P, rows[name])
        assert c["process"] < 1.0 and not c["right"], name


def test_arith_steps_one_check_per_required_step():
    assert ARITH.steps(P["solution"], P) == [True, True]
    assert ARITH.steps("7+5=12\n#### 18", P) == [True, False]           # the missing step fails
    assert ARITH.steps("#### 18", P) == [False, False]                  # never an empty list
    assert ARITH.steps("", P) == [False, False]
    assert ARITH.steps("7+5=12\n12+6=18\n18+0=18\n#### 18", P) == [True, True, False]   # one too many
    assert ARITH.steps("7+5=12\n12+6=18\n#### 18\n#### 18", P) == [True, True, False]  # an answer mid-way
    assert ARITH.verify(P["solution"], P) and ARITH.verify("#### 18", P)
    assert not ARITH.verify("7+5=12\n12+6=18\n#### 17\n#### 18", P)
    assert not ARITH.verify(P["solution"] + "\nso 18", P)


def test_empty_step_list_is_never_every_step_right():
    class NoSteps(Task):   # a verifier that accepts, and no step checks at all
        def steps(self, text, p):
            return []
    p = dict(question="q", answer="18")
    assert NoSteps().verify("#### 18", p) and not is_right(NoSteps(), "#### 18", p)
    c = score(NoSteps(), TOK, p, trace("#### 18"))
    assert c["outcome"] == 1.0 and c["backtrack"] == 0.0 and not c["right"]


def countdown_rows():
    clean = CD["solution"]
    lines = clean.split("\n")
    return {
        "clean": trace(clean),
        "answer_only": trace("#### 29"),
        "skip_first_step": trace("21+8=29\n#### 29"),
        "skip_last_step": trace("3*7=21\n#### 29"),
        "hedged": trace("3*7=21\n21+8=29\n#### 28\n#### 29"),
        "answer_twice": trace(clean + "\n#### 29"),
        "step_after_answer": trace(clean + "\n3+7=10"),
        "repeated_line": trace("3*7=21\n3*7=21\n21+8=29\n#### 29"),
        "solution_twice": trace(clean + "\n" + clean),
        "slip_fixed": trace("3*7=22", "<", "1\n21+8=29\n#### 29"),
        "bk_spam_on_empty": [BK] * 6 + trace(clean),
        "bk_spam_retype": trace(*[x for l in lines for x in (l, "<", l[-1], "\n")][:-1]),
        "wrong": trace("3*7=21\n21+7=28\n#### 28"),
        "failed_fix": trace("3*7=22", "<", "0\n20+8=28\n#### 28"),
        "empty": [EOT],
        "truncated": trace(clean, "|cut"),
    }


def test_countdown_clean_solution_strictly_beats_every_shortcut():
    assert_clean_is_strictly_best(COUNTDOWN, CD, countdown_rows())
    rows = countdown_rows()
    for name in ("hedged", "answer_twice", "step_after_answer", "solution_twice"):
        c = score(COUNTDOWN, TOK, CD, rows[name])
        assert c["outcome"] == 0.0 and c["format"] == 0.5 and not c["right"], name
    c = score(COUNTDOWN, TOK, CD, rows["answer_only"])
    assert c["process"] == 0.0 and not c["right"] and c["backtrack"] == 0.0


@pytest.mark.parametrize("name", ["arith", "countdown"])
def test_every_generated_solution_is_right_and_scores_full(name):
    task = get_task(name)
    for p in task.problems("train", n=50):
        c = score(task, TOK, p, trace(p["solution"]))
        assert c["right"] and (c["outcome"], c["process"], c["backtrack"], c["format"]) == (1.0, 1.0, 1.0, 1.0)


@pytest.mark.parametrize("name", ["arith", "countdown"])
def test_clean_solution_still_strictly_best_under_any_prm_that_passes_it(name):
    """train_grpo.py --prm: the process component comes from a learned model, which a policy can
    fool. Under the clip form no shortcut can score more process reward than a clean solution the
    PRM passes, and the other components alone still order every row of the table below it, so
    the property holds whatever the PRM says of the shortcuts (0, 0.5 or the top score 1)."""
    task, problem, rows = (ARITH, P, arith_rows()) if name == "arith" else (COUNTDOWN, CD, countdown_rows())
    assert_clean_is_strictly_best(task, problem, rows, prm=(0.0, 0.5, 1.0))
    assert prm_process_score([0.2, 0.4, 0.1]) == 1.0   # the clean solution's score when every step passes
