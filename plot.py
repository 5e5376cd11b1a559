"""
A run's metrics.jsonl as a picture: curves.svg beside it, drawn by hand (no plotting dependency).

    python plot.py --run=out/grpo          # writes out/grpo/curves.svg
    python plot.py --run=out/sft --keys=loss,eval/t1/acc

Every training stage calls write_run_curves at the end of a run (stopped or finished), so a run
already has its picture; this command draws one for any run folder, during a run too. One panel
per quantity, with the stage's series of it drawn together: loss, accuracy (held-out greedy and
T=1, and GRPO's rollout accuracy), reward, backtracks per sample.
"""
import json
import math
import os
import sys
from dataclasses import dataclass

from common import cli, configure

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]

# (panel title, does key k belong to it): the quantities a reader of a run looks at first
PANELS = [
    ("loss", lambda k: k == "loss"),
    ("accuracy", lambda k: k == "acc" or (k.startswith("eval/") and k.endswith("/acc"))),
    ("reward", lambda k: k == "reward_mean"),
    ("backtracks per sample", lambda k: k.endswith("bk_per_sample")),
]


@dataclass
class Config:
    run: str = "out/sft"   # a run folder holding metrics.jsonl
    keys: str = ""         # comma-separated metric names, one panel each; "" = the panels above
    out: str = ""          # "" = <run>/curves.svg


def number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_metrics(path):
    """The rows of a metrics.jsonl; a bad line is named by its number."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
    return rows


def series(rows, key):
    """(step, value) of every row that logs key as a finite number."""
    return [(r["step"], r[key]) for r in rows if number(r.get(key)) and number(r.get("step"))]


def panels_of(rows, keys=None):
    """[(title, {key: points})]: the default panels that have data, or one panel per asked key."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    groups = [(k, [k]) for k in keys] if keys else [(t, [k for k in names if belongs(k)]) for t, belongs in PANELS]
    out = []
    for title, ks in groups:
        lines = {k: pts for k in ks if (pts := series(rows, k))}
        if lines:
            out.append((title, lines))
    return out


def panel(title, lines, x0, y0, w, h, xlabel="step", pad=44):
    """SVG elements of one chart at (x0, y0): its lines, axes with their ranges, and a legend."""
    pts = [p for ps in lines.values() for p in ps]
    xmin, xmax = min(x for x, _ in pts), max(x for x, _ in pts)
    ymin, ymax = min(y for _, y in pts), max(y for _, y in pts)
    if 0 <= ymin and ymax <= 1 and "accuracy" in title:
        ymin, ymax = 0.0, 1.0   # accuracies on their natural scale, so runs read side by side
    xmax, ymax = (xmax if xmax > xmin else xmin + 1), (ymax if ymax > ymin else ymin + 1)
    X = lambda x: x0 + pad + (w - 2 * pad) * (x - xmin) / (xmax - xmin)
    Y = lambda y: y0 + h - pad + 10 - (h - 2 * pad) * (y - ymin) / (ymax - ymin)
    el = [f'<text x="{x0 + w / 2}" y="{y0 + 16}" text-anchor="middle" font-weight="bold">{title}</text>',
          f'<line x1="{X(xmin)}" y1="{Y(ymin)}" x2="{X(xmax)}" y2="{Y(ymin)}" stroke="black"/>',
          f'<line x1="{X(xmin)}" y1="{Y(ymin)}" x2="{X(xmin)}" y2="{Y(ymax)}" stroke="black"/>',
          f'<text x="{X(xmin)}" y="{Y(ymin) + 14}" text-anchor="middle">{xmin:g}</text>',
          f'<text x="{X(xmax)}" y="{Y(ymin) + 14}" text-anchor="middle">{xmax:g}</text>',
          f'<text x="{(X(xmin) + X(xmax)) / 2}" y="{Y(ymin) + 28}" text-anchor="middle">{xlabel}</text>',
          f'<text x="{X(xmin) - 4}" y="{Y(ymin) + 4}" text-anchor="end">{ymin:.3g}</text>',
          f'<text x="{X(xmin) - 4}" y="{Y(ymax) + 4}" text-anchor="end">{ymax:.3g}</text>']
    for i, (label, ps) in enumerate(lines.items()):
        c = COLORS[i % len(COLORS)]
        if len(ps) == 1:   # one evaluation: a dot, since a line needs two points
            el.append(f'<circle cx="{X(ps[0][0]):.1f}" cy="{Y(ps[0][1]):.1f}" r="3" fill="{c}"/>')
        else:
            el.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="' +
                      " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in ps) + '"/>')
        el.append(f'<text x="{x0 + w - pad}" y="{y0 + 32 + 14 * i}" text-anchor="end" fill="{c}">{label}</text>')
    return el


def write_svg(charts, path, cols=2, w=420, h=280, xlabel="step"):
    """charts: [(title, {label: [(x, y), ...]})], laid out in a grid of `cols` columns."""
    cols = max(1, min(cols, len(charts)))
    rows = max(1, math.ceil(len(charts) / cols))
    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * cols}" height="{h * rows}" '
          'font-family="sans-serif" font-size="11">', f'<rect width="{w * cols}" height="{h * rows}" fill="white"/>']
    for i, (title, lines) in enumerate(charts):
        el += panel(title, lines, (i % cols) * w, (i // cols) * h, w, h, xlabel)
    el.append("</svg>")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(el) + "\n")
    os.replace(tmp, path)


def write_run_curves(run_dir, keys=None, out=None):
    """Draw run_dir/metrics.jsonl into out (default run_dir/curves.svg); returns the path, or None
    when the run has logged nothing to draw."""
    charts = panels_of(read_metrics(os.path.join(run_dir, "metrics.jsonl")), keys)
    if not charts:
        return None
    out = out or os.path.join(run_dir, "curves.svg")
    write_svg(charts, out)
    return out


def main(argv=None):
    cfg = Config()
    configure(cfg, sys.argv[1:] if argv is None else argv)
    if not os.path.isfile(os.path.join(cfg.run, "metrics.jsonl")):
        raise ValueError(f"--run={cfg.run}: no metrics.jsonl there (a training run's --out_dir)")
    keys = [k.strip() for k in cfg.keys.split(",") if k.strip()] or None
    out = write_run_curves(cfg.run, keys, cfg.out or None)
    if out is None:
        raise ValueError(f"--run={cfg.run}: metrics.jsonl has no " + (f"numeric values of --keys={cfg.keys}" if keys
                         else "loss, accuracy, reward or backtrack figures to draw"))
    print(f"wrote {out}")


if __name__ == "__main__":
    cli(main)
