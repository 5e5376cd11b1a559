"""plot.py: a run's metrics.jsonl drawn as curves.svg, by the trainers and by the command."""
import json
import os
import re
import subprocess
import sys
import xml.dom.minidom

import train_sft
from plot import write_run_curves
from test_cli import ROOT, assert_one_line_error
from test_train_sft import TINY


def polylines(path):
    """{legend label: [(x, y), ...]} of an SVG written by plot.py (each line is followed by its label)."""
    svg = open(path).read()
    xml.dom.minidom.parseString(svg)   # well-formed
    out = {}
    for pts, label in re.findall(r'<polyline [^>]*points="([^"]+)"/>\n<text [^>]*>([^<]+)</text>', svg):
        out[label] = [tuple(map(float, p.split(","))) for p in pts.split()]
    return out, svg


def write_metrics(path, rows):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_each_quantity_is_a_panel_and_each_series_keeps_its_order(tmp_path):
    rows = [dict(step=s, loss=2.0 / (s + 1), reward_mean=s / 10, bk_per_sample=1.0 - s / 10, acc=s / 10)
            for s in range(10)]
    rows += [{"step": s, "eval/greedy/acc": a, "eval/t1/acc": a / 2} for s, a in ((0, 0.2), (5, 0.6), (9, 0.9))]
    rows.append(dict(step=9, rank_weight_hashes=["x", "x"], loss=float("nan")))   # not numbers: never drawn
    write_metrics(tmp_path, rows)
    out = write_run_curves(str(tmp_path))
    lines, svg = polylines(out)
    for title in ("loss", "accuracy", "reward", "backtracks per sample"):
        assert f">{title}</text>" in svg
    assert set(lines) == {"loss", "acc", "eval/greedy/acc", "eval/t1/acc", "reward_mean", "bk_per_sample"}
    assert [len(lines[k]) for k in ("loss", "eval/greedy/acc")] == [10, 3]
    for pts in lines.values():   # steps left to right; SVG y grows downwards
        assert [x for x, _ in pts] == sorted(x for x, _ in pts)
    assert all(a[1] < b[1] for a, b in zip(lines["loss"], lines["loss"][1:]))          # falling loss: y grows
    assert all(a[1] > b[1] for a, b in zip(lines["reward_mean"], lines["reward_mean"][1:]))


def test_the_command_draws_asked_keys_and_rejects_bad_input(tmp_path):
    write_metrics(tmp_path, [dict(step=s, loss=1.0 / (s + 1), kl=s * 0.01) for s in range(5)])
    p = subprocess.run([sys.executable, "plot.py", f"--run={tmp_path}", "--keys=kl"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0 and str(tmp_path) in p.stdout, p.stderr
    assert set(polylines(os.path.join(tmp_path, "curves.svg"))[0]) == {"kl"}
    run = lambda *a: subprocess.run([sys.executable, "plot.py", *a], cwd=ROOT, capture_output=True, text=True)
    assert_one_line_error(run(f"--run={tmp_path / 'none'}"), "--run", "metrics.jsonl")
    assert_one_line_error(run(f"--run={tmp_path}", "--keys=nope"), "--keys=nope")
    with open(os.path.join(tmp_path, "metrics.jsonl"), "a") as f:
        f.write("{not json\n")
    assert_one_line_error(run(f"--run={tmp_path}"), "metrics.jsonl:6")


def test_a_training_run_leaves_its_picture(tmp_path):
    out = str(tmp_path / "sft")
    train_sft.main(TINY + [f"--out_dir={out}", "--max_iters=4", "--eval_interval=2", "--eval_n=2"])
    lines, svg = polylines(os.path.join(out, "curves.svg"))
    assert {"loss", "eval/greedy/acc"} <= set(lines) and len(lines["loss"]) >= 2
