"""
The ablation in one command: does backtracking help, and which way of training it?

    python ablate.py                                  # all variants, 3 seeds, writes out/ablation/
    python ablate.py --variants=clean,rewind --seeds=1 --tokens=300000

Every variant is trained from scratch on the same task with the same number of training tokens
(backtrack traces are longer than clean ones, so each variant gets its own step count), then
evaluated by evaluate.py on the same held-out problems, greedy and at T=1.0, and, with
--long_kwargs, on a harder split (e.g. more variables than training) too. The clean model is also
sampled --vote_k times per problem: its majority vote (no oracle) is the baseline at equal
generated tokens, and pass@k (an oracle picks any right sample) an upper bound. Variants:

    clean            SFT on clean solutions only (no backtrack token in the data)
    keep_masked      backtrack traces, errors visible (`keep`), no loss on error tokens
    keep_unmasked    backtrack traces, errors visible, loss on error tokens too
    rewind           backtrack traces, error-hiding layout (`rewind`), no loss on error tokens
    retry_keep       deps retry data (a line whose inputs are not ready, started and undone; Physics of
                     Language Models 2.2) at --retry_rate 0.5 (an sft_args flag), at most 16 BKs a
                     trace: errors visible, trained on (unmasked)
    retry_keep_masked, retry_rewind, retry_rewind_unmasked: the same with masking / the `rewind` layout
    retry_weak_keep  retry_weak data (a line from later in the solution, undone), errors visible
    search_keep      deps search data (every undone attempt of a depth-first search from the query, at
                     every line: --augment=search --retry_rate=1), errors visible and trained on
    search_rewind    the same under `rewind`: the attempts leave the context once undone
    <v>+grpo       the SFT model of <v>, then GRPO (--grpo_iters steps)
    <v>+self       the SFT model of <v>, then a second SFT round (--stage_iters steps) with half of
                   each batch drawn from its own errors (self_errors.py)
    <v>+dpo        the SFT model of <v>, then token-level DPO (--stage_iters steps) on pairs from
                   its own errors
    rewind_head      rewind with a verifier head (--verifier_weight=1). With --triggers, every model
                     with a head is also evaluated with head-triggered backtracks at each tau
    <v>+grpo_prm   GRPO whose process reward is the <v> model's own head (train_grpo.py --prm)
    <v>+located    as +self, but the errors located by rollouts (self_errors.py --locate=rollouts,
                   --rollouts each): its head, if any, now also learns from the model's own samples;
                   the table beside reports how often the located first error is the step checker's
                   and what the search cost
    <v>+located_prm  GRPO from the <v> model with the +located model's head as its process reward
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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from common import cli, configure, read_json, require
from plot import write_svg

HERE = os.path.dirname(os.path.abspath(__file__))

VARIANTS = {
    "clean": ["--backtrack_ratio=0.0"],
    "keep_masked": ["--policy=keep", "--mask_errors=True"],
    "keep_unmasked": ["--policy=keep", "--mask_errors=False"],
    "rewind": ["--policy=rewind", "--mask_errors=True"],
    "retry_keep": ["--augment=retry", "--backtrack_ratio=1.0", "--curriculum=0:16", "--policy=keep", "--mask_errors=False"],
    "retry_keep_masked": ["--augment=retry", "--backtrack_ratio=1.0", "--curriculum=0:16", "--policy=keep", "--mask_errors=True"],
    "retry_rewind": ["--augment=retry", "--backtrack_ratio=1.0", "--curriculum=0:16", "--policy=rewind", "--mask_errors=True"],
    "retry_rewind_unmasked": ["--augment=retry", "--backtrack_ratio=1.0", "--curriculum=0:16", "--policy=rewind", "--mask_errors=False"],
    "search_keep": ["--augment=search", "--backtrack_ratio=1.0", "--curriculum=0:64", "--policy=keep", "--mask_errors=False",
                    "--retry_rate=1.0"],
    "search_rewind": ["--augment=search", "--backtrack_ratio=1.0", "--curriculum=0:64", "--policy=rewind",
                      "--mask_errors=False", "--retry_rate=1.0"],
    # sudoku: a depth-first solver's traces (--augment=dfs; every trace is a search, and one that
    # needs no undo is clean), no cap on the BKs
    "dfs_rewind": ["--augment=dfs", "--backtrack_ratio=1.0", "--curriculum=0:none", "--policy=rewind", "--mask_errors=True"],
    "dfs_rewind_unmasked": ["--augment=dfs", "--backtrack_ratio=1.0", "--curriculum=0:none", "--policy=rewind",
                            "--mask_errors=False"],
    "dfs_keep": ["--augment=dfs", "--backtrack_ratio=1.0", "--curriculum=0:none", "--policy=keep", "--mask_errors=True"],
    "dfs_keep_unmasked": ["--augment=dfs", "--backtrack_ratio=1.0", "--curriculum=0:none", "--policy=keep",
                          "--mask_errors=False"],
    "rewind_head": ["--policy=rewind", "--mask_errors=True", "--verifier_weight=1.0"],
    "retry_weak_keep": ["--augment=retry_weak", "--backtrack_ratio=1.0", "--curriculum=0:16", "--policy=keep", "--mask_errors=False"],
}


@dataclass
class Config:
    out_dir: str = "out/ablation"
    variants: str = "clean,keep_masked,keep_unmasked,rewind,rewind+grpo"
    seeds: int = 3
    tokens: int = 2_000_000          # training tokens per SFT run (equal across variants)
    task: str = "arith"
    task_kwargs: str = ""            # the training task's settings (e.g. "min_vars=3,max_vars=6")
    long_kwargs: str = ""            # a harder held-out split's settings (e.g. "min_vars=8,max_vars=10"); "" = none
    max_new_tokens: int = 0          # for evaluation; 0 = each checkpoint's own
    vote_k: int = 4                  # samples per problem for the clean model's majority vote and pass@k; 0 = none
    eval_n: int = 300
    eval_points: int = 4             # held-out evaluations during each SFT run (the curves)
    grpo_iters: int = 100
    stage_iters: int = 300           # steps of the +self and +dpo stages
    self_n: int = 300                # train problems sampled (x4) for the model's own errors
    rollouts: int = 4                # +located: continuations per checked prefix
    triggers: str = ""               # head-triggered evaluations of every model with a head, e.g. "0.35,0.5,0.65"
    oracle: bool = False             # also the clean model as proposer in a depth-first search its task's rule checker verifies (sudoku)
    jobs: int = 1                    # runs at a time, each with cores/jobs threads (small models use 2 cores better as 2 jobs)
    sft_args: str = ""               # extra --key=value args for every SFT run, space separated
    grpo_args: str = ""


THREADS = {}   # the environment of the runs: OMP_NUM_THREADS when several run at a time (main sets it)


def run(script, *args):
    """Run one stage exactly as a user would, in its own process (stages never import each other)."""
    cmd = [sys.executable, os.path.join(HERE, script), *args]
    if subprocess.run(cmd, env=dict(os.environ, **THREADS)).returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[1:])} failed")


def curve(path):
    """(step, held-out greedy accuracy) of the evaluations logged during training."""
    rows = [json.loads(l) for l in open(os.path.join(path, "metrics.jsonl"))]
    return [(r["step"], r["eval/greedy/acc"]) for r in rows if "eval/greedy/acc" in r]


def trigger_taus(cfg):
    """--triggers as a list of tau strings (as written: they name files and table rows)."""
    return [t.strip() for t in cfg.triggers.split(",") if t.strip()]


def triggers(cfg, path):
    """The trigger thresholds to evaluate this checkpoint at: --triggers when it has a verifier head."""
    has_head = read_json(os.path.join(path, "config.json"))["config"].get("verifier", False)
    return trigger_taus(cfg) if has_head else []


def final_eval(cfg, path, vote):
    """evaluate.py on the test split and, with --long_kwargs, the harder one; flattened as
    '<split>/<greedy|t1|vote>/<metric>'. vote: also the k-sample majority vote and pass@k. A model
    with a head is also evaluated at each --triggers tau, as 'trigger<tau>:<split>/...'."""
    res = {}
    splits = [("test", cfg.task_kwargs)] + ([("long", cfg.long_kwargs)] if cfg.long_kwargs else [])
    for tau in [""] + triggers(cfg, path):
        for split, kw in splits:
            out = os.path.join(path, f"eval_{split}{'_trigger' + tau if tau else ''}.json")
            run("evaluate.py", f"--ckpt={path}", f"--n={cfg.eval_n}", f"--out={out}", "--seed=1",
                *([f"--task_kwargs={kw}"] if kw else []), *([f"--max_new_tokens={cfg.max_new_tokens}"] if cfg.max_new_tokens else []),
                *([f"--samples={cfg.vote_k}"] if vote and cfg.vote_k > 1 and not tau else []),
                *(["--oracle_search=True"] if vote and cfg.oracle and not tau else []), *([f"--trigger={tau}"] if tau else []))
            for label, m in read_json(out).items():
                if label in ("greedy", "oracle_search") or label.startswith(("T=", "vote")):   # the passes, not task_kwargs
                    key = {"greedy": "greedy", "oracle_search": "oracle"}.get(label, "vote" if label.startswith("vote") else "t1")
                    res.update({f"{'trigger' + tau + ':' if tau else ''}{split}/{key}/{k}": v for k, v in m.items()})
    return res


def run_grpo(cfg, run_dir, out, seed, args, extra=()):
    """GRPO from the base run (args, the base's SFT flags, are not GRPO's; extra flags are)."""
    run("train_grpo.py", f"--init_from={run_dir}", f"--out_dir={out}", f"--seed={seed}", f"--max_iters={cfg.grpo_iters}",
        f"--eval_interval={cfg.grpo_iters}", f"--eval_n={cfg.eval_n}", "--progress=False", *cfg.grpo_args.split(), *extra)


def own_errors(cfg, run_dir, seed):
    """The model's own errors as traces and DPO pairs, made once per base run."""
    traces, pairs = os.path.join(run_dir, "self_traces.jsonl"), os.path.join(run_dir, "self_pairs.jsonl")
    if not os.path.exists(traces):
        run("self_errors.py", f"--ckpt={run_dir}", f"--n={cfg.self_n}", f"--out={traces}", f"--pairs_out={pairs}",
            f"--seed={seed}")
    return traces, pairs


def located_errors(cfg, run_dir, seed):
    """The model's own errors located by rollouts, once per base run: (traces, search stats)."""
    traces = os.path.join(run_dir, "located_traces.jsonl")
    if not os.path.exists(traces):
        run("self_errors.py", f"--ckpt={run_dir}", f"--n={cfg.self_n}", f"--out={traces}", f"--seed={seed}",
            "--locate=rollouts", f"--rollouts={cfg.rollouts}")
    return traces, read_json(os.path.splitext(traces)[0] + ".stats.json")


def run_self(cfg, run_dir, out, seed, args, traces=None):
    traces = traces or own_errors(cfg, run_dir, seed)[0]
    run("train_sft.py", *args, f"--init_from={run_dir}", f"--out_dir={out}", f"--seed={seed}", f"--traces_file={traces}",
        "--traces_ratio=0.5", f"--max_iters={cfg.stage_iters}", f"--eval_interval={cfg.stage_iters}",
        f"--save_interval={cfg.stage_iters}", f"--eval_n={cfg.eval_n}", "--progress=False",
        "--lr=3e-4", "--min_lr=3e-5", "--warmup_iters=10")


def run_dpo(cfg, run_dir, out, seed, args):
    _, pairs = own_errors(cfg, run_dir, seed)
    run("train_dpo.py", f"--init_from={run_dir}", f"--out_dir={out}", f"--seed={seed}", f"--pairs_file={pairs}",
        f"--max_iters={cfg.stage_iters}", f"--eval_interval={cfg.stage_iters}", f"--eval_n={cfg.eval_n}",
        "--eval_at_start=False", "--progress=False")


def run_located(cfg, run_dir, out, seed, args):
    run_self(cfg, run_dir, out, seed, args, traces=located_errors(cfg, run_dir, seed)[0])


def run_grpo_prm(cfg, run_dir, out, seed, args, prm=None):
    run_grpo(cfg, run_dir, out, seed, args, extra=[f"--prm={prm or run_dir}"])


def run_located_prm(cfg, run_dir, out, seed, args):
    prm = run_dir + "-located"   # the +located model: its head has learned from the model's own located errors
    if not os.path.exists(os.path.join(prm, "train_state.pt")):
        run_located(cfg, run_dir, prm, seed, args)
    run_grpo_prm(cfg, run_dir, out, seed, args, prm)


STAGES = {"": None, "grpo": run_grpo, "self": run_self, "dpo": run_dpo, "grpo_prm": run_grpo_prm,
          "located": run_located, "located_prm": run_located_prm}


def check_args(cfg):
    """Every argument, before any work: one line naming the bad one. Returns the variants."""
    require(cfg, "seeds tokens eval_n eval_points grpo_iters stage_iters self_n jobs", lambda v: v >= 1, "must be at least 1")
    for t in trigger_taus(cfg):
        try:
            ok = 0 < float(t) < 1
        except ValueError:
            ok = False
        if not ok:
            raise SystemExit(f"error: --triggers={cfg.triggers}: each tau a probability in (0, 1)")
    variants = [v.strip() for v in cfg.variants.split(",") if v.strip()]
    for v in variants:
        base, _, stage = v.partition("+")
        if base not in VARIANTS or stage not in STAGES:
            raise SystemExit(f"error: unknown variant {v!r}; known: {', '.join(VARIANTS)}, each also with "
                             f"{', '.join('+' + s for s in STAGES if s)}")
    return variants


def one_seed(cfg, base, seed, variants, results, save):
    """Train (or find) one base run, evaluate it, and run its second stages. Finished runs are kept
    in results: the ablation can be resumed."""
    args = [f"--task={cfg.task}", *([f"--task_kwargs={cfg.task_kwargs}"] if cfg.task_kwargs else []),
            *VARIANTS[base], *cfg.sft_args.split()]
    name = f"{base}/seed{seed}"
    run_dir = os.path.join(cfg.out_dir, base, f"seed{seed}")
    if name not in results:
        # equal tokens: train_sft sets each variant's step count from its own tokens per step
        if not os.path.exists(os.path.join(run_dir, "train_state.pt")):
            run("train_sft.py", *args, f"--out_dir={run_dir}", f"--seed={seed}", f"--max_tokens={cfg.tokens}",
                f"--evals={cfg.eval_points}", f"--save_interval={10 ** 9}", f"--eval_n={cfg.eval_n}",
                "--progress=False")
        iters = read_json(os.path.join(run_dir, "config.json"))["train_config"]["max_iters"]
        save(name, dict(variant=base, seed=seed, iters=iters, curve=[(s / iters, a) for s, a in curve(run_dir)],
                        **final_eval(cfg, run_dir, vote=base == "clean")))
    for stage in STAGES:
        v = f"{base}+{stage}"
        if stage and v in variants and f"{v}/seed{seed}" not in results:
            out = run_dir + "-" + stage
            if not os.path.exists(os.path.join(out, "train_state.pt")):
                STAGES[stage](cfg, run_dir, out, seed, args)
            row = dict(variant=v, seed=seed, **final_eval(cfg, out, vote=False))
            if stage.startswith("located"):   # what locating the errors found and cost
                found = located_errors(cfg, run_dir, seed)[1]
                row.update({f"locate/{k}": x for k, x in found.items() if isinstance(x, (int, float))})
            save(f"{v}/seed{seed}", row)


def cell(runs, k):
    """mean ± std over seeds of one metric (GFLOPs for a flops key); n/a where no run has it."""
    xs = [r[k] * (1e-9 if "flops" in k else 1) for r in runs if r.get(k) is not None and r[k] == r[k]]
    return "n/a" if not xs else f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.3f}"


def make_table(cfg, variants, results):
    """The table: mean ± std over seeds. Beside each row, what it cost on the harder split (the
    last): tokens generated per problem (BKs included) and forward GFLOPs per problem
    (evaluate.forward_flops). Returns (markdown, the mean curve of each variant)."""
    splits = ["test"] + (["long"] if cfg.long_kwargs else [])
    last = splits[-1]
    cols = [(f"{m} ({sp})", f"{sp}/{k}/acc") for sp in splits for m, k in (("greedy", "greedy"), ("T=1", "t1"))]
    cols += [(f"deletion precision greedy ({last})", f"{last}/greedy/precision"),
             (f"deletion precision T=1 ({last})", f"{last}/t1/precision"),
             (f"bk/sample T=1 ({last})", f"{last}/t1/bk_per_sample"),
             (f"tokens/problem greedy ({last})", f"{last}/greedy/mean_len"),
             (f"GFLOPs/problem greedy ({last})", f"{last}/greedy/flops_per_problem")]
    lines = ["| variant | seeds | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 2) + "|"]

    def baseline(label, runs, acc_cols, keys):
        """A row whose accuracy sits in the acc_cols ('greedy' or 'T=1') of each split, its costs from keys."""
        row = [cell(runs, f"{sp}/{keys[0]}") if c == acc_cols else "" for sp in splits for c in ("greedy", "T=1")]
        row += ["", "", "", cell(runs, f"{last}/{keys[1]}"), cell(runs, f"{last}/{keys[2]}")]
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(row) + " |")

    curves = {}
    for v in variants:
        runs = [r for r in results.values() if r["variant"] == v]
        if not runs:
            continue
        lines.append(f"| {v} | {len(runs)} | " + " | ".join(cell(runs, k) for _, k in cols) + " |")
        for tau in [t for t in trigger_taus(cfg) if any(f"trigger{t}:test/greedy/acc" in r for r in runs)]:
            lines.append(f"| {v}, head trigger {tau} | {len(runs)} | "
                         + " | ".join(cell(runs, f"trigger{tau}:{k}") for _, k in cols) + " |")
        if v == "clean" and cfg.vote_k > 1:   # the baselines at equal generated tokens
            baseline(f"clean, majority of {cfg.vote_k} at T=1", runs, "T=1",
                     ("vote/majority_acc", "vote/tokens_per_problem", "vote/flops_per_problem"))
            baseline(f"clean, pass@{cfg.vote_k} at T=1 (oracle picks)", runs, "T=1",
                     ("vote/pass_at_k", "vote/tokens_per_problem", "vote/flops_per_problem"))
        if v == "clean" and cfg.oracle:
            baseline("clean proposes, rule checker verifies (DFS)", runs, "greedy",
                     ("oracle/acc", "oracle/mean_len", "oracle/flops_per_problem"))
        if all(r.get("curve") for r in runs):   # a run trained with no evaluations has no curve
            pts = list(zip(*[r["curve"] for r in runs]))
            curves[v] = [(statistics.mean(p[0] for p in col), statistics.mean(p[1] for p in col)) for col in pts]
    return "\n".join(lines + location_table(cfg, variants, results)), curves


def location_table(cfg, variants, results):
    """Rollout-located first errors (self_errors.py --locate=rollouts) against the step checker: the
    table's lines, none without a +located variant."""
    located = [v for v in variants if v.partition("+")[2].startswith("located")]
    if not located:
        return []
    loc = [("searched", "searched"), ("located", "located"), ("agrees with the checker", "checker_agree"),
           ("rollout tokens per located error", "tokens_per_located"), ("traces kept", "traces")]
    lines = ["", f"First errors located by rollouts ({cfg.rollouts} per checked prefix), from the base models' "
             f"samples of {cfg.self_n} x 4 train problems:", "",
             "| base | seeds | " + " | ".join(c for c, _ in loc) + " |", "|---" * (len(loc) + 2) + "|"]
    for v in dict.fromkeys(v.partition("+")[0] for v in located):
        runs = [r for r in results.values() if r["variant"].startswith(v + "+located")]
        runs = list({r["seed"]: r for r in runs}.values())   # one search per base run
        lines.append(f"| {v} | {len(runs)} | " + " | ".join(cell(runs, f"locate/{k}") for _, k in loc) + " |")
    return lines


def main(argv=None):
    cfg = Config()
    configure(cfg, sys.argv[1:] if argv is None else argv)
    variants = check_args(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    results_path = os.path.join(cfg.out_dir, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    t_start = time.time()
    lock = threading.Lock()

    def save(name, row):
        with lock:
            results[name] = row
            tmp = results_path + ".tmp"
            json.dump(results, open(tmp, "w"), indent=1)
            os.replace(tmp, results_path)

    if cfg.jobs > 1:
        THREADS["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.jobs))
    jobs = [(base, seed) for base in dict.fromkeys(v.partition("+")[0] for v in variants) for seed in range(cfg.seeds)]
    with ThreadPoolExecutor(cfg.jobs) as pool:   # threads only wait on subprocesses
        for f in [pool.submit(one_seed, cfg, *j, variants, results, save) for j in jobs]:
            f.result()
    table, curves = make_table(cfg, variants, results)
    with open(os.path.join(cfg.out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    if curves:
        write_svg([("held-out greedy accuracy during SFT", curves)], os.path.join(cfg.out_dir, "curves.svg"),
                  cols=1, w=640, h=400, xlabel="fraction of SFT training")
    print(table)
    print(f"ablation: {time.time() - t_start:.0f}s; {results_path}, table.md, curves.svg in {cfg.out_dir}")


if __name__ == "__main__":
    cli(main)
