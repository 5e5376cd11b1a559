"""
The same work under TRL's trainers: bench.py's section `trl`. A researcher who does not use this
codebase fine-tunes with TRL (SFTTrainer, GRPOTrainer, DPOTrainer); this measures a step of each of
our three stages against TRL's on the same model, data, batch and settings, on this machine's CPU.

Both sides start from one random model in the default shape (GPT-2 layout, 4 layers x 192, byte
tokenizer; the vocabulary unpadded, 258 rows, since a Hugging Face model samples from every row of
its head while ours never draws a padding id), saved once as this project's checkpoint and once exported as a Hugging Face folder
(GPT.export_hf, equal logits to 1e-5), which TRL opens. Each side runs its real training loop in a
fresh process (ours: train_sft.py, train_grpo.py, train_dpo.py with their command lines; TRL: its
trainer's `train()`), and a step's time is the median gap between consecutive step ends after the
first two (ours from metrics.jsonl's elapsed_s, TRL's from a TrainerCallback), so the loading, the
dataset preparation and the saves at either end are left out on both sides.

The work is made equal where the two differ by default:
- the `keep` context policy (a BK is an ordinary token of a causal sequence, which is all TRL
  knows); our `rewind` layout is other work and is not compared;
- SFT: one JSONL file of backtrack traces, fed to ours with --traces_file (every row of a batch
  drawn from it) and to TRL pre-tokenized, with our error mask as its labels (-100 where an error
  token carries no loss); 32 traces a step, AdamW(0.9, 0.99), weight decay 0.1, clip 1.0, fp32;
- GRPO: 16 arith prompts x 8 completions (ours samples under its bans: no BK on an empty response,
  at most 8 BKs; TRL samples freely, a difference of a few tokens in a thousand), 64 new tokens at T=1, our reward (reward.py) as TRL's
  reward function, loss dapo, beta 0 (no reference model), one pass, one forward of 128 rows, and
  learning rate 0 (the update runs in full, but the model stays the one both sides started from, so
  they sample equally long completions in expectation; with learning, each side's first steps move
  the end-of-text probability differently and the work stops being equal);
- DPO: the same pairs (prompt + shared prefix, chosen, rejected), 16 a step, sigmoid loss, beta 0.1,
  the reference's log-probs computed once before training on both sides (TRL's
  precompute_ref_log_probs, which is what ours does).
Dropout is off on both sides. TRL is an optional dependency (requirements-bench.txt): without it
the section is skipped.
"""
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

import torch

from augment import build_traces
from data import Rule, Trace, layout
from model import GPT, GPTConfig
from tasks import get_task, prompt_ids
from tokenizer import get_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 1337
BLOCK = 160   # a trace of 3 backtracks plus its prompt fits; TRL truncates at max_length, ours refuses
BETA2, CLIP = 0.99, 1.0   # AdamW's beta2 and the gradient clip: every stage's default, set on both sides
SKIP = 2                  # steps left out of each median: the first ones pay for warm-up
SFT = dict(batch=32, lr=2e-3, weight_decay=0.1)
GRPO = dict(prompts=16, group=8, new_tokens=64, lr=0.0)   # lr 0: every iteration samples the same model, so both sides generate equal tokens in expectation
DPO = dict(batch=16, lr=1e-5, beta=0.1)


def trl_version():
    """TRL's version, or None when it is not installed (the section is then skipped)."""
    try:
        import trl
        return trl.__version__
    except ImportError:
        return None

# -----------------------------------------------------------------------------
# the shared starting point: one model in two formats, one traces file, one pairs file


def write_setup(d, n_traces=512, n_pairs=256):
    """Write into folder d: ours/ (this project's checkpoint), hf/ (the same weights as a Hugging
    Face folder), traces.jsonl, pairs.jsonl and problems.jsonl (GRPO's prompts and answers)."""
    tok, task = get_tokenizer("byte"), get_task("arith")
    torch.manual_seed(SEED)
    model = GPT(GPTConfig(block_size=BLOCK, vocab_size=tok.n_vocab, n_layer=4, n_head=4, n_embd=192,
                          tokenizer="byte", n_vocab=tok.n_vocab, eot_id=tok.eot_id, bk_id=tok.bk_id))
    meta = dict(task="arith", task_kwargs={}, policy="keep", slot_bans=True, max_retries=None, max_new_tokens=64,
                stage="sft")
    model.save(os.path.join(d, "ours"), meta=meta)
    model.export_hf(os.path.join(d, "hf"))
    rng = random.Random(SEED)
    pool = task.problems("train", n=n_traces + n_pairs, seed=SEED)
    traces = build_traces(tok, task, pool[:n_traces], rng, backtrack_ratio=0.5, max_backtracks=3, max_len=BLOCK)
    with open(os.path.join(d, "traces.jsonl"), "w") as f:
        for t in traces:
            f.write(json.dumps(dict(prompt=t.prompt, response=t.response)) + "\n")
    with open(os.path.join(d, "pairs.jsonl"), "w") as f:
        for p in pool[n_traces:]:
            f.write(json.dumps(synthetic_pair(tok, task, p, rng)) + "\n")
    with open(os.path.join(d, "problems.jsonl"), "w") as f:
        for p in pool[:n_traces]:
            f.write(json.dumps(p) + "\n")


def synthetic_pair(tok, task, p, rng):
    """A DPO pair in train_dpo.py's format, shaped like self_errors.py's: the solution's start and a
    wrong token as the shared prefix; chosen = a BK and the right continuation, rejected = a wrong
    continuation of about the same length (digits drawn at random)."""
    sol = tok.encode(p["solution"]) + [tok.eot_id]
    k = rng.randrange(1, len(sol) - 1)
    wrong = [t for t in tok.encode("0123456789") if t != sol[k]]
    rejected = [rng.choice(wrong) for _ in range(len(sol) - k - 1)] + [tok.eot_id]
    return dict(prompt=prompt_ids(tok, task, p), prefix=sol[:k] + [rng.choice(wrong)],
                chosen=[tok.bk_id] + sol[k:], rejected=rejected)

# -----------------------------------------------------------------------------
# our side: the real scripts, timed from their metrics log


def step_times(values):
    """Per-step seconds from cumulative timestamps (one per step)."""
    return [b - a for a, b in zip(values, values[1:])]


def settled_median(xs):
    """The median of per-step figures after the first SKIP (all of them when there are no more)."""
    return statistics.median(xs[SKIP:] or xs)


def run_ours(d, stage, steps, threads):
    """One of our stages for `steps` steps in a fresh process. Returns the median step time and,
    for GRPO, the median rollout time within it."""
    out = os.path.join(d, f"out_{stage}")
    common = [f"--out_dir={out}", f"--max_iters={steps}", "--eval_interval=0", "--log_interval=1",
              f"--save_interval={10 * steps}", "--progress=False", f"--seed={SEED}", f"--beta2={BETA2}",
              f"--grad_clip={CLIP}"]
    if stage == "sft":
        argv = ["train_sft.py", f"--init_from={d}/ours", "--policy=keep", f"--traces_file={d}/traces.jsonl",
                "--traces_ratio=1.0", f"--batch_size={SFT['batch']}", f"--lr={SFT['lr']}", f"--min_lr={SFT['lr']}",
                f"--block_size={BLOCK}", "--warmup_iters=0", f"--weight_decay={SFT['weight_decay']}"]
    elif stage == "grpo":
        n = GRPO["prompts"] * GRPO["group"]
        argv = ["train_grpo.py", f"--init_from={d}/ours", f"--prompts_per_step={GRPO['prompts']}",
                f"--group_size={GRPO['group']}", f"--max_new_tokens={GRPO['new_tokens']}", f"--micro_batch={n}",
                "--loss_type=dapo", "--beta=0.0", "--eval_at_start=False", f"--lr={GRPO['lr']}", f"--min_lr={GRPO['lr']}"]
    else:
        argv = ["train_dpo.py", f"--init_from={d}/ours", f"--pairs_file={d}/pairs.jsonl", f"--batch_size={DPO['batch']}",
                f"--beta={DPO['beta']}", f"--lr={DPO['lr']}", f"--min_lr={DPO['lr']}", "--warmup_iters=0",
                "--eval_at_start=False"]
    subprocess.run([sys.executable] + argv + common, cwd=HERE, env=child_env(threads), check=True,
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "elapsed_s" in r]
    r = dict(step_s=settled_median(step_times([x["elapsed_s"] for x in rows])))
    if stage == "grpo":
        r["generate_s"] = settled_median(step_times([x["rollout_s"] for x in rows]))
        r["tokens"] = statistics.mean(x["completion_len"] for x in rows) * GRPO["prompts"] * GRPO["group"]
    return r


def child_env(threads):
    env = dict(os.environ, PYTHONPATH=HERE)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env

# -----------------------------------------------------------------------------
# TRL's side: its trainers, in a child process (python -c "import vs_trl; vs_trl.trl_child(...)")


def run_trl(d, stage, steps, threads):
    code = f"import vs_trl; vs_trl.trl_child({d!r}, {stage!r}, {steps})"
    p = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=child_env(threads), check=True,
                       capture_output=True, text=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def trl_child(d, stage, steps):
    """Train with TRL's trainer for `steps` steps; print one JSON line: the median step time and
    where it went (inside the trainer's step: forward + backward, the optimizer; outside it: data
    and logging; GRPO: generating and scoring)."""
    import time
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    import trl
    transformers.logging.set_verbosity_error()
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    hf = os.path.join(d, "hf")
    tokenizer = AutoTokenizer.from_pretrained(hf)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_pdrop=0.0, resid_pdrop=0.0,
                                                 embd_pdrop=0.0)
    marks = []   # (event, time)

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k): marks.append(("begin", time.perf_counter()))
        def on_pre_optimizer_step(self, *a, **k): marks.append(("pre_opt", time.perf_counter()))
        def on_optimizer_step(self, *a, **k): marks.append(("opt", time.perf_counter()))
        def on_step_end(self, *a, **k): marks.append(("end", time.perf_counter()))

    same = dict(output_dir=os.path.join(d, f"trl_{stage}"), max_steps=steps, logging_steps=1, save_strategy="no",
                report_to="none", use_cpu=True, bf16=False, seed=SEED, disable_tqdm=True, lr_scheduler_type="constant",
                warmup_steps=0, adam_beta1=0.9, adam_beta2=BETA2, max_grad_norm=CLIP,
                dataloader_num_workers=0)
    tok, task = get_tokenizer("byte"), get_task("arith")
    gen = []
    if stage == "sft":
        traces = [json.loads(line) for line in open(os.path.join(d, "traces.jsonl"))]
        rows = [trl_labels(t, tok.bk_id) for t in traces]
        args = trl.SFTConfig(per_device_train_batch_size=SFT["batch"], learning_rate=SFT["lr"],
                             weight_decay=SFT["weight_decay"], max_length=BLOCK, packing=False, **same)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer, callbacks=[Clock()])
    elif stage == "grpo":
        trainer = trl_grpo_trainer(d, model, tokenizer, same, tok, task, gen, [Clock()])
    else:
        rows = []
        for line in open(os.path.join(d, "pairs.jsonl")):
            p = json.loads(line)
            # the EOS TRL appends to each completion is the end-of-text our completions end with
            rows.append(dict(prompt=tok.decode(p["prompt"] + p["prefix"]), chosen=tok.decode(p["chosen"][:-1]),
                             rejected=tok.decode(p["rejected"][:-1])))
        args = trl.DPOConfig(per_device_train_batch_size=DPO["batch"], learning_rate=DPO["lr"], beta=DPO["beta"],
                             loss_type="sigmoid", precompute_ref_log_probs=True, weight_decay=0.0, max_length=BLOCK,
                             disable_dropout=True, **same)
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer, callbacks=[Clock()])
    if stage == "sft":
        r0 = bare_models(d, trainer, traces, rows, tok)
    trainer.train()
    ends = [t for e, t in marks if e == "end"]
    begins = [t for e, t in marks if e == "begin"]
    pre = [t for e, t in marks if e == "pre_opt"]
    opt = [t for e, t in marks if e == "opt"]
    med = settled_median
    r = dict(step_s=med([b - a for a, b in zip(ends, ends[1:])]),
             forward_backward_s=med([p - b for b, p in zip(begins, pre)]),
             optimizer_s=med([o - p for p, o in zip(pre, opt)]),
             outside_s=med([b - e for e, b in zip(ends, begins[1:])]))
    if stage == "sft":
        r.update(r0)
    if gen:
        r["generate_s"] = med([g for g, _ in gen])
        r["tokens"] = statistics.mean(n for _, n in gen)
    print(json.dumps(r))


def trl_grpo_trainer(d, model, tokenizer, same, tok, task, gen, callbacks):
    """TRL's GRPO trainer on the problems in d, scored by reward.py as train_grpo.py scores; its
    generate-and-score phase timed into gen as (seconds, completion tokens)."""
    import time
    import trl
    from datasets import Dataset
    from reward import RewardConfig, score, total
    from schedules import WeightSchedule
    problems = [json.loads(line) for line in open(os.path.join(d, "problems.jsonl"))]
    weights, rc = WeightSchedule.from_string("constant").at(0.0), RewardConfig()

    def reward(prompts, completions, completion_ids, problem, **kw):   # reward.py, as train_grpo.py scores
        return [total(score(task, tok, json.loads(p), list(c), 8.0, rc), weights)
                for p, c in zip(problem, completion_ids)]

    data = Dataset.from_list([dict(prompt=tok.decode(prompt_ids(tok, task, p)), problem=json.dumps(p))
                              for p in problems])
    n = GRPO["prompts"] * GRPO["group"]
    args = trl.GRPOConfig(per_device_train_batch_size=n, num_generations=GRPO["group"], generation_batch_size=n,
                          max_completion_length=GRPO["new_tokens"], temperature=1.0, top_k=0, top_p=1.0,
                          beta=0.0, loss_type="dapo", scale_rewards="group", num_iterations=1,
                          learning_rate=GRPO["lr"], weight_decay=0.0, disable_dropout=True, **same)

    class Timed(trl.GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            gen.append((time.perf_counter() - t0, int(out["completion_mask"].sum())))
            return out

    return Timed(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer,
                 callbacks=callbacks)


def bare_models(d, trainer, traces, rows, tok, reps=3):
    """The two models' forward + backward alone on one batch of SFT traces (TRL's collator's batch for
    the Hugging Face model, our collate for ours; rows are the traces as TRL's examples), best of
    reps, with their losses: what of the step gap is the model and what is the loop around it."""
    import time
    from data import collate
    from model import sft_loss
    n = SFT["batch"]
    hf_batch = trainer.data_collator(rows[:n])
    ours = GPT.from_pretrained(os.path.join(d, "ours")).train()
    batch = collate([layout(Trace(t["prompt"], t["response"]), tok.bk_id, Rule("keep"), mask_errors=True) for t in traces[:n]])
    hf_model = trainer.model

    def timed(fn):
        best = float("inf")
        for _ in range(reps + 1):   # the first is a warm-up
            t0 = time.perf_counter()
            loss = fn()
            loss.backward()
            best = min(best, time.perf_counter() - t0)
        hf_model.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)
        return best, loss.item()

    hf_s, hf_loss = timed(lambda: hf_model(**hf_batch).loss)
    ours_s, ours_loss = timed(lambda: sft_loss(ours, batch))
    return dict(bare_hf_s=hf_s, bare_ours_s=ours_s, bare_hf_loss=hf_loss, bare_ours_loss=ours_loss)


def trl_labels(t, bk_id):
    """A trace as TRL's pre-tokenized SFT example: input_ids = prompt + response; labels = each
    response token where our `keep` layout trains on predicting it (with mask_errors an error token
    carries no loss), else -100 (TRL shifts labels by one inside its loss, as our layout's actions
    read each token off the node before it)."""
    L = layout(Trace(t["prompt"], t["response"]), bk_id, Rule("keep"), mask_errors=True)
    labels = [-100] * len(t["prompt"]) + [y if w > 0 else -100 for y, w in zip(L["tgt"], L["weight"])]
    return dict(input_ids=t["prompt"] + t["response"], labels=labels)

# -----------------------------------------------------------------------------


def bench_trl(steps=12, grpo_steps=6, threads=0):
    """Both sides of each stage; returns {stage: {"ours": ..., "trl": ...}}."""
    out = {}
    with tempfile.TemporaryDirectory() as d:
        write_setup(d)
        for stage, n in (("sft", steps), ("grpo", grpo_steps), ("dpo", steps)):
            out[stage] = dict(ours=run_ours(d, stage, n, threads), trl=run_trl(d, stage, n, threads))
    return out
