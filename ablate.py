"""
The ablation in one command: does backtracking help, and which way of training it?

    python ablate.py                                  # all variants, 3 seeds, writes out/ablation/
    python ablate.py --variants=clean,rewind --seeds=1 --tokens=300000

Every variant is trained from scratch on the same task with the same number of training tokens
(backtrack traces are longer than clean ones, so each variant gets its own step count), then
evaluated on the same held-out problems, greedy and at T=1.0. Variants:

    clean          SFT on clean solutions only (no backtrack token in the data)
    keep_masked    backtrack traces, errors visible (`keep`), no loss on error tokens
    keep_unmasked  backtrack traces, errors visible, loss on error tokens too
    rewind         backtrack traces, error-hiding layout (`rewind`), no loss on error tokens
    <v>+grpo       the SFT model of <v>, then GRPO (--grpo_iters steps)
    <v>+self       the SFT model of <v>, then a second SFT round (--stage_iters steps) with half of
                   each batch drawn from its own errors (self_errors.py)
    <v>+dpo        the SFT model of <v>, then token-level DPO (--stage_iters steps) on pairs from
                   its own errors
The second stages add training on top of the base run; compare them with each other and with
their base, not with the base variants at equal tokens.

It writes out/ablation/results.json (every run), table.md (mean +- std over seeds) and
curves.svg (held-out greedy accuracy during SFT, mean over seeds).
"""
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from common import cli, configure, read_json

HERE = os.path.dirname(os.path.abspath(__file__))

VARIANTS = {
    "clean": ["--backtrack_ratio=0.0"],
    "keep_masked": ["--policy=keep", "--mask_errors=True"],
    "keep_unmasked": ["--policy=keep", "--mask_errors=False"],
    "rewind": ["--policy=rewind", "--mask_errors=True"],
}


@dataclass
class Config:
    out_dir: str = "out/ablation"
    variants: str = "clean,keep_masked,keep_unmasked,rewind,rewind+grpo"
    seeds: int = 3
    tokens: int = 2_000_000          # training tokens per SFT run (equal across variants)
    task: str = "arith"
    eval_n: int = 300
    eval_points: int = 4             # held-out evaluations during each SFT run (the curves)
    grpo_iters: int = 100
    stage_iters: int = 300           # steps of the +self and +dpo stages
    self_n: int = 300                # train problems sampled (x4) for the model's own errors
    sft_args: str = ""               # extra --key=value args for every SFT run, space separated
    grpo_args: str = ""


def run(script, *args):
    """Run one stage exactly as a user would, in its own process (stages never import each other)."""
    cmd = [sys.executable, os.path.join(HERE, script), *args]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[1:])} failed")


def final_eval(path):
    rows = [json.loads(l) for l in open(os.path.join(path, "metrics.jsonl"))]
    evals = [r for r in rows if "eval/greedy/acc" in r]
    return evals[-1], [(r["step"], r["eval/greedy/acc"]) for r in evals]


def run_grpo(cfg, run_dir, out, seed, args):
    run("train_grpo.py", f"--init_from={run_dir}", f"--out_dir={out}", f"--seed={seed}", f"--max_iters={cfg.grpo_iters}",
        f"--eval_interval={cfg.grpo_iters}", f"--eval_n={cfg.eval_n}", "--progress=False", *cfg.grpo_args.split())


def own_errors(cfg, run_dir, seed):
    """The model's own errors as traces and DPO pairs, made once per base run."""
    traces, pairs = os.path.join(run_dir, "self_traces.jsonl"), os.path.join(run_dir, "self_pairs.jsonl")
    if not os.path.exists(traces):
        run("self_errors.py", f"--ckpt={run_dir}", f"--n={cfg.self_n}", f"--out={traces}", f"--pairs_out={pairs}",
            f"--seed={seed}")
    return traces, pairs


def run_self(cfg, run_dir, out, seed, args):
    traces, _ = own_errors(cfg, run_dir, seed)
    run("train_sft.py", *args, f"--init_from={run_dir}", f"--out_dir={out}", f"--seed={seed}", f"--traces_file={traces}",
        "--traces_ratio=0.5", f"--max_iters={cfg.stage_iters}", f"--eval_interval={cfg.stage_iters}",
        f"--save_interval={cfg.stage_iters}", f"--eval_n={cfg.eval_n}", "--progress=False",
        "--lr=3e-4", "--min_lr=3e-5", "--warmup_iters=10")


def run_dpo(cfg, run_dir, out, seed, args):
    _, pairs = own_errors(cfg, run_dir, seed)
    run("train_dpo.py", f"--init_from={run_dir}", f"--out_dir={out}", f"--seed={seed}", f"--pairs_file={pairs}",
        f"--max_iters={cfg.stage_iters}", f"--eval_interval={cfg.stage_iters}", f"--eval_n={cfg.eval_n}",
        "--eval_at_start=False", "--progress=False")


STAGES = {"": None, "grpo": run_grpo, "self": run_self, "dpo": run_dpo}


def write_svg(curves, path, w=640, h=400, pad=50):
    """A plain SVG line chart (no plotting dependency): {label: [(x, y), ...]}, y in [0, 1]."""
    xmax = max((x for pts in curves.values() for x, _ in pts), default=1) or 1
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
    X = lambda x: pad + (w - 2 * pad) * x / xmax
    Y = lambda y: h - pad - (h - 2 * pad) * y
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{pad}" y1="{Y(0)}" x2="{w - pad}" y2="{Y(0)}" stroke="black"/>',
           f'<line x1="{pad}" y1="{Y(0)}" x2="{pad}" y2="{Y(1)}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 10}" text-anchor="middle">fraction of SFT training</text>',
           f'<text x="12" y="{h / 2}" transform="rotate(-90 12 {h / 2})" text-anchor="middle">held-out greedy accuracy</text>']
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<text x="{pad - 6}" y="{Y(t) + 4}" text-anchor="end">{t:g}</text>')
    for i, (label, pts) in enumerate(curves.items()):
        c = colors[i % len(colors)]
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="' +
                   " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in pts) + '"/>')
        out.append(f'<text x="{w - pad + 4 - 120}" y="{pad + 16 * i}" fill="{c}">{label}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


def main(argv=None):
    cfg = Config()
    configure(cfg, sys.argv[1:] if argv is None else argv)
    for k in ("seeds", "tokens", "eval_n", "eval_points", "grpo_iters", "stage_iters", "self_n"):
        if getattr(cfg, k) < 1:
            raise SystemExit(f"error: --{k}={getattr(cfg, k)}: must be at least 1")
    variants = [v.strip() for v in cfg.variants.split(",") if v.strip()]
    for v in variants:
        base, _, stage = v.partition("+")
        if base not in VARIANTS or stage not in STAGES:
            raise SystemExit(f"error: unknown variant {v!r}; known: {', '.join(VARIANTS)}, each also with "
                             f"{', '.join('+' + s for s in STAGES if s)}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    results_path = os.path.join(cfg.out_dir, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    extra = cfg.sft_args.split()
    t_start = time.time()
    for base in dict.fromkeys(v.partition("+")[0] for v in variants):
        args = [f"--task={cfg.task}", *VARIANTS[base], *extra]
        for seed in range(cfg.seeds):
            name = f"{base}/seed{seed}"
            run_dir = os.path.join(cfg.out_dir, base, f"seed{seed}")
            if name not in results:   # finished runs are kept: the ablation can be resumed
                # equal tokens: train_sft sets each variant's step count from its own tokens per step
                run("train_sft.py", *args, f"--out_dir={run_dir}", f"--seed={seed}", f"--max_tokens={cfg.tokens}",
                    f"--evals={cfg.eval_points}", f"--save_interval={10 ** 9}", f"--eval_n={cfg.eval_n}",
                    "--progress=False")
                iters = read_json(os.path.join(run_dir, "config.json"))["train_config"]["max_iters"]
                last, curve = final_eval(run_dir)
                results[name] = dict(variant=base, seed=seed, iters=iters, curve=[(s / iters, a) for s, a in curve], **last)
                json.dump(results, open(results_path, "w"), indent=1)
            for stage in STAGES:
                v = f"{base}+{stage}"
                if stage and v in variants and f"{v}/seed{seed}" not in results:
                    out = run_dir + "-" + stage
                    STAGES[stage](cfg, run_dir, out, seed, args)
                    last, _ = final_eval(out)
                    results[f"{v}/seed{seed}"] = dict(variant=v, seed=seed, **last)
                    json.dump(results, open(results_path, "w"), indent=1)
    # the table: mean +- std over seeds
    cols = [("greedy acc", "eval/greedy/acc"), ("T=1 acc", "eval/t1/acc"), ("bk/sample (T=1)", "eval/t1/bk_per_sample"),
            ("backtracked (T=1)", "eval/t1/share_backtracked"), ("precision (T=1)", "eval/t1/precision")]
    lines = ["| variant | seeds | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    curves = {}
    for v in variants:
        runs = [r for r in results.values() if r["variant"] == v]
        if not runs:
            continue
        cells = []
        for _, k in cols:
            xs = [r[k] for r in runs if r.get(k) is not None and r[k] == r[k]]
            cells.append("n/a" if not xs else f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.3f}")
        lines.append(f"| {v} | {len(runs)} | " + " | ".join(cells) + " |")
        if all("curve" in r for r in runs):
            pts = list(zip(*[r["curve"] for r in runs]))
            curves[v] = [(statistics.mean(p[0] for p in col), statistics.mean(p[1] for p in col)) for col in pts]
    table = "\n".join(lines)
    with open(os.path.join(cfg.out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    write_svg(curves, os.path.join(cfg.out_dir, "curves.svg"))
    print(table)
    print(f"ablation: {time.time() - t_start:.0f}s; {results_path}, table.md, curves.svg in {cfg.out_dir}")


if __name__ == "__main__":
    cli(main)
