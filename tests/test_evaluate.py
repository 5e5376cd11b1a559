"""The evaluator's backtrack statistics on hand-built completions."""
import math

from heldout import longest_run, summarize
from reward import deletion_stats
from tasks import get_task
from tokenizer import Tokenizer

BK = 99


def test_deletion_stats_hand_built():
    ref = [1, 2, 3, 4]
    assert deletion_stats([1, 2, 3, 4], ref, BK) == (0, 0)
    assert deletion_stats([1, 7, BK, 2, 3, 4], ref, BK) == (1, 0)          # a wrong token deleted
    assert deletion_stats([1, 2, BK, 2, 3, 4], ref, BK) == (0, 1)          # a right token deleted
    assert deletion_stats([1, 7, 8, BK, BK, 2], ref, BK) == (2, 0)         # 8 sits on a wrong path
    assert deletion_stats([1, 2, 3, BK, BK, BK, 1], ref, BK) == (0, 3)
    assert deletion_stats([BK, 1, 2], ref, BK) == (0, 0)                   # nothing to delete


def test_summarize_counts():
    recs = [dict(correct=True, backtracks=2, necessary=2, unnecessary=0, finished=True, hit_cap=False, response=[0] * 10,
                 out_of_tokens=False, longest_pop=2),
            dict(correct=False, backtracks=1, necessary=0, unnecessary=1, finished=True, hit_cap=True, response=[0] * 6,
                 out_of_tokens=False, longest_pop=1),
            dict(correct=True, backtracks=0, necessary=0, unnecessary=0, finished=False, hit_cap=False, response=[0] * 8,
                 out_of_tokens=True, longest_pop=0),
            dict(correct=False, backtracks=0, necessary=0, unnecessary=0, finished=False, hit_cap=False, response=[0] * 4,
                 out_of_tokens=False, longest_pop=0)]
    m = summarize(recs)
    assert m["out_of_tokens"] == 1 / 4 and m["stalled"] == 1 / 4 and m["longest_pop"] == 3 / 4
    recs = recs[:3]
    m = summarize(recs)
    assert m["acc"] == 2 / 3 and m["bk_per_sample"] == 1.0 and m["share_backtracked"] == 2 / 3
    assert m["precision"] == 2 / 3 and m["unnecessary_per_sample"] == 1 / 3
    assert m["corrections_right"] == 0.5 and m["hit_cap"] == 1 / 3 and m["finished"] == 2 / 3
    assert math.isnan(summarize(recs[2:])["precision"])


def test_longest_run_of_backtracks():
    assert longest_run([1, BK, 2, BK, BK, BK, 3, BK, BK], BK) == 3
    assert longest_run([1, 2], BK) == 0 and longest_run([], BK) == 0


def test_deletions_judged_on_a_real_task():
    tok, task = Tokenizer("byte"), get_task("arith")
    p = task.problems("test", n=1)[0]
    ref = tok.encode(p["solution"]) + [tok.eot_id]
    wrong = ref[:3] + [ord("7") if ref[3] != ord("7") else ord("8")] + [tok.bk_id] + ref[3:]
    assert deletion_stats(wrong, ref, tok.bk_id) == (1, 0)
