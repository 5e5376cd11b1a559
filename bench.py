"""
The project's one benchmark: speed and memory figures of the model, its KV cache and training.
Targets live here as printed figures, never in timed tests; every ratio is measured in one run
against a baseline timed in the same process. The measurements are speed.py's; this file
runs them by section and prints the report.

1. decode: tokens/s with the KV cache (decode.generate) vs a full re-forward of the growing
   sequence each step (nanoGPT's generate), at the default tiny shape and GPT-2 small.
   hf: greedy decode against Hugging Face `generate` on the same weights (same tokens), at both
   shapes, batch 1 and 16 (transformers is a test-only dependency: without it the figure is skipped).
2. rewind: cost of KVCache.rewind on one row at cache length 64 and 4096 (should be flat), and of
   a rewind-decode step (rewind + the next logits), beside a normal one-token decode step.
3. batch: 16 rows in one cache vs the same 16 rows one by one; batched replays of forced traces
   with 20% backtracks under policy 'rewind' and 'keep', against plain decoding (no backtracks).
   rollout: the shares of a 64-row sampled rollout step that generate's bookkeeping and its
   sampler take beside the model's forward, all timed inside the same run.
4. head: the loss head (sft_loss: sparse bans, fused cross-entropy) against lm_head + F.cross_entropy
   on the same hidden states, at GPT-2's vocabulary.
   data: the share of the default SFT step spent on building its data, inline and with
   data.Prefetch building it on a background thread.
   train: tokens/s of forward + backward + AdamW for the causal `keep` layout (mask=None fast path)
   and the `rewind` tree layout (explicit (B, T, T) mask), MFU against a large matmul measured in
   this run, and the time data.layout/collate take per batch.
5. gpu (CUDA only): training and rollout tokens/s and MFU of a random model shaped like Qwen2.5-0.5B.
6. lora: trainable parameters, step time and peak memory of a LoRA SFT step against full fine-tuning
   at the Qwen2.5-0.5B shape on this device's CPU, each in its own process; and on paper, the bytes
   a step holds at the Qwen2.5-0.5B and Llama-3.1-8B shapes (weights, gradients, AdamW moments).
7. trl: a step of train_sft.py, train_grpo.py and train_dpo.py against TRL's SFTTrainer, GRPOTrainer
   and DPOTrainer on the same model, data, batch and settings (vs_trl.py says how the work is made
   equal), each side's real loop in its own process, and where each side's step goes. TRL is an
   optional dependency: pip install -r requirements-bench.txt (without it the section is skipped).

$ python bench.py                                  # CPU fp32, about 9 minutes on 2 idle cores (with TRL)
$ python bench.py --quick=True                     # smoke run, under a minute
$ python bench.py --sections=hf,rollout,head      # some sections only
$ python bench.py --device=cuda --dtype=bfloat16 --compile=True --out=bench.json
"""

import json
import os
import resource
import sys
import time
from dataclasses import asdict

import torch

from common import configure
from vs_trl import bench_trl, trl_version
from speed import (Config, bench_batched, bench_decode, bench_large, bench_loss_head, bench_rewind, bench_rollout,
                   bench_lora, bench_sft_data, bench_train, bench_vs_hf, gpt2_config, llama8b_config, lora_plan, make_model,
                   matmul_peak, qwen_config, tiny_config)

# -----------------------------------------------------------------------------
# the table


ROWS = []


def record(section, name, value, unit, target=None, met=None):
    """One figure; printed at once (the run is long) and collected for the final table."""
    status = "" if met is None else ("met" if met else "MISSED")
    ROWS.append(dict(section=section, figure=name, value=value, unit=unit, target=target or "", status=status))
    print(f"  {section:<7} {name:<46} {fmt(value):>11} {unit:<7} {target or '':<9} {status}", flush=True)


def fmt(v):
    if isinstance(v, bool):
        return "yes" if v else "no"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def print_table():
    print()
    print(f"{'section':<7}   {'figure':<46} {'value':>11} {'unit':<7} {'target':<9} status")
    print("-" * 96)
    for r in ROWS:
        print(f"{r['section']:<7}   {r['figure']:<46} {fmt(r['value']):>11} {r['unit']:<7} {r['target']:<9} {r['status']}")

# -----------------------------------------------------------------------------
# the sections, each recording its figures


def decode_figures(args, ptdtype, shapes):
    """1. decode: the KV cache against a full re-forward, batch 1, at each shape."""
    for name, cfg in shapes:
        model = make_model(cfg, args.device, ptdtype, args.seed)
        r = bench_decode(model, args.new_tokens, args.prompt_len, args.reps, nocache_reps=1 if name == "gpt2-small" else args.reps,
                         seed=args.seed)
        record("decode", f"{name}: KV cache, {args.new_tokens} new tokens, batch 1", r["cache_tps"], "tok/s")
        record("decode", f"{name}: no cache (full re-forward)", r["nocache_tps"], "tok/s")
        ratio = r["cache_tps"] / r["nocache_tps"]
        record("decode", f"{name}: cache / no cache", ratio, "x", ">= 5x", ratio >= 5)
        del model


def hf_figures(args, ptdtype, shapes):
    """1. decode against Hugging Face generate, greedy, batch 1 and batch_rows, at each shape."""
    for name, cfg in shapes:
        n = args.hf_tokens if name == "tiny" else args.hf_gpt2_tokens
        for rows in (1, args.batch_rows):
            r = bench_vs_hf(cfg, rows, n, args.prompt_len, args.reps, args.device, ptdtype, args.seed)
            if r is None:
                print("  hf      skipped: transformers is not installed (pip install transformers)")
                break
            record("hf", f"{name}: batch {rows}, {n} new tokens, greedy", r["ours_tps"], "tok/s")
            record("hf", f"{name}: Hugging Face generate, same", r["hf_tps"], "tok/s")
            record("hf", f"{name}: same tokens", r["same_tokens"], "", "yes", r["same_tokens"])
            ratio = r["ours_tps"] / r["hf_tps"]
            record("hf", f"{name}, batch {rows}: ours / Hugging Face", ratio, "x", ">= 1.2x", ratio >= 1.2)


def rewind_figures(args, ptdtype):
    """2. rewind: the cost of a pop against the cache's length, and the cache's memory."""
    cfg = tiny_config(args, pos="rope", block_size=max(args.rewind_lengths) + 1)
    r = bench_rewind(cfg, args.rewind_lengths, args.n_rewinds, args.device, ptdtype, seed=args.seed)
    lo, hi = min(args.rewind_lengths), max(args.rewind_lengths)
    for L in args.rewind_lengths:
        record("rewind", f"KVCache.pop, one row, length {L}", r[f"rewind_us_{L}"], "us")
    ratio = r[f"rewind_us_{hi}"] / r[f"rewind_us_{lo}"]
    record("rewind", f"rewind cost {hi} / {lo}", ratio, "x", "~1 (<1.5)", ratio < 1.5)
    for L in args.rewind_lengths:
        record("rewind", f"rewind + next logits, length {L}", r[f"rewind_step_us_{L}"], "us")
    ratio = r[f"rewind_step_us_{hi}"] / r[f"rewind_step_us_{lo}"]
    record("rewind", f"rewind + next logits {hi} / {lo}", ratio, "x", "~1 (<1.5)", ratio < 1.5)
    for L in args.rewind_lengths:
        record("rewind", f"(normal 1-token decode step, length {L})", r[f"decode_step_us_{L}"], "us")
    record("rewind", "cache storage never moved (in place)", r["in_place"], "", "yes", r["in_place"])
    record("memory", "KV cache bytes per token (k, v, h)", r["kv_bytes_per_token"], "B")


def batch_figures(args, ptdtype):
    """3. batch: many rows in one cache against one by one, and batched replays under each policy."""
    model = make_model(tiny_config(args), args.device, ptdtype, args.seed)
    r = bench_batched(model, args.batch_rows, args.new_tokens, args.prompt_len, args.forced_bk, args.reps, seed=args.seed)
    record("batch", f"tiny: {args.batch_rows} rows in one cache, {args.new_tokens} tokens each", r["batch_tps"], "tok/s")
    record("batch", f"tiny: {args.batch_rows} rows one by one", r["seq_tps"], "tok/s")
    ratio = r["batch_tps"] / r["seq_tps"]
    record("batch", "tiny: batched / sequential", ratio, "x", ">= 8x", ratio >= 8)
    record("batch", f"tiny: bare forward step, {args.batch_rows} rows vs 1 (ceiling)", r["forward_ceiling"], "x")
    bk = f"{100 * r['forced_bk_frac']:.0f}% BK"
    record("batch", f"forced traces, {bk}, policy keep", r["forced_keep_tps"], "act/s")
    record("batch", f"forced traces, {bk}, policy rewind", r["forced_rewind_tps"], "act/s")
    record("batch", "forced traces, no BK (plain decoding)", r["forced_plain_tps"], "act/s")
    record("batch", "rewind / keep", r["forced_rewind_tps"] / r["forced_keep_tps"], "x")
    ratio = r["forced_rewind_tps"] / r["forced_plain_tps"]
    record("batch", f"rewind at {bk} / plain decoding", ratio, "x", ">= 1x", ratio >= 1)
    if args.gpt2_small and args.gpt2_batch_tokens:
        # a model big enough that a batch-1 step is bound by reading the weights, not by compute
        g = bench_batched(make_model(gpt2_config(), args.device, ptdtype, args.seed), args.batch_rows,
                          args.gpt2_batch_tokens, args.prompt_len, reps=1, forced=False, seed=args.seed)
        record("batch", f"gpt2-small: {args.batch_rows} rows in one cache, {args.gpt2_batch_tokens} tokens each", g["batch_tps"], "tok/s")
        record("batch", f"gpt2-small: {args.batch_rows} rows one by one", g["seq_tps"], "tok/s")
        ratio = g["batch_tps"] / g["seq_tps"]
        record("batch", "gpt2-small: batched / sequential", ratio, "x", ">= 8x", ratio >= 8)
        record("batch", f"gpt2-small: bare forward step, {args.batch_rows} rows vs 1 (ceiling)", g["forward_ceiling"], "x")


def rollout_figures(args, ptdtype):
    """3. rollout: a GRPO-sized rollout step and where its time goes."""
    r = bench_rollout(make_model(tiny_config(args), args.device, ptdtype, args.seed), args.rollout_rows,
                      args.rollout_tokens, args.prompt_len, args.reps, seed=args.seed)
    tag = f"tiny: {args.rollout_rows} rows x {args.rollout_tokens}, {100 * r['bk_share']:.0f}% BK"
    record("rollout", f"{tag}, one step", r["step_us"], "us")
    record("rollout", f"{tag}, of which model forward", r["model_us"], "us")
    record("rollout", "all beyond the model forward / step", 100 * r["overhead"], "%")
    record("rollout", "  sampler (log-softmax, inverse-CDF draw)", 100 * r["sampler"], "%")
    record("rollout", "  bookkeeping (stacks, bans, caps, rows)", 100 * r["bookkeeping"], "%", "<= 3%",
           r["bookkeeping"] <= 0.03)
    record("rollout", "call setup + final transfer / call", 100 * r["setup"], "%")


def head_figures(args):
    """4. the loss head against lm_head + cross-entropy."""
    r = bench_loss_head(args.head_actions, reps=args.reps, dev=args.device, p=args.forced_bk, seed=args.seed)
    tag = f"{r['n_actions']} actions, {r['n_bans']} bans, vocab 50304"
    record("head", f"sft_loss head, fwd + bwd, {tag}", r["head_ms"], "ms")
    record("head", "lm_head + F.cross_entropy, same hidden states", r["plain_ms"], "ms")
    ratio = r["head_ms"] / r["plain_ms"]
    record("head", "loss head / lm_head + cross-entropy", ratio, "x", "<= 1.05x", ratio <= 1.05)


def data_figures(args):
    """4. SFT data preparation: its share of a step, inline and prefetched."""
    r = bench_sft_data(args.sft_steps, args.device, seed=args.seed)
    record("data", "default SFT step (32 traces, rewind), data built inline", r["step_ms"], "ms")
    record("data", "of which building the data", r["data_ms"], "ms")
    record("data", "data / step, inline", 100 * r["inline_share"], "%")
    record("data", "step with data.Prefetch", r["prefetch_step_ms"], "ms")
    record("data", "of which waiting for data", r["wait_ms"], "ms")
    record("data", "waiting for data / step, prefetched", 100 * r["wait_share"], "%", "<= 1%", r["wait_share"] <= 0.01)


def train_figures(args, ptdtype):
    """4. training tokens/s and MFU for each policy's layout; returns the measured matmul peak."""
    peak = matmul_peak(args.matmul_n, args.device, ptdtype)
    record("train", f"peak: {args.matmul_n}^3 matmul, {args.dtype}", peak / 1e9, "GFLOP/s")
    model = make_model(tiny_config(args), args.device, seed=args.seed)  # fp32 weights; a lower dtype comes in through autocast
    r = bench_train(model, args.train_batch, args.train_len, args.train_iters, args.p_bk, peak, ptdtype, args.compile,
                    seed=args.seed)
    for policy in ("keep", "rewind"):
        T = r[f"{policy}_T"]
        tag = "causal, mask=None" if policy == "keep" else "tree, (B,T,T) mask"
        record("train", f"{policy} ({tag}), {args.train_batch}x{T}", r[f"{policy}_tps"], "tok/s")
        if r[f"{policy}_real_tps"] < 0.999 * r[f"{policy}_tps"]:
            record("train", f"{policy}: without padding", r[f"{policy}_real_tps"], "tok/s")
        record("train", f"{policy}: MFU", 100 * r[f"{policy}_mfu"], "%")
        record("train", f"{policy}: model step", r[f"{policy}_step_ms"], "ms")
        record("train", f"{policy}: data.layout per batch", r[f"{policy}_layout_ms"], "ms")
        record("train", f"{policy}: data.collate per batch", r[f"{policy}_collate_ms"], "ms")
        record("train", f"{policy}: data prep / model step",
               (r[f"{policy}_layout_ms"] + r[f"{policy}_collate_ms"]) / r[f"{policy}_step_ms"], "x")

    return peak


def gpu_figures(args, ptdtype, peak):
    """5. a Qwen2.5-0.5B-shaped model on a GPU: training and rollout tokens/s and MFU."""
    peak = peak or matmul_peak(args.matmul_n * 4, args.device, ptdtype)
    cfg = qwen_config()
    r = bench_large(cfg, args.device, ptdtype, args.gpu_batch, args.gpu_len, args.gpu_rollout_rows,
                    args.gpu_rollout_tokens, peak=peak, seed=args.seed)
    tag = f"qwen2.5-0.5b shape ({r['params'] / 1e6:.0f}M)"
    record("gpu", f"{tag}: train {args.gpu_batch}x{args.gpu_len}, {args.dtype}", r["train_tps"], "tok/s")
    record("gpu", f"{tag}: train MFU", 100 * r["train_mfu"], "%")
    record("gpu", f"{tag}: rollout {args.gpu_rollout_rows} rows x {args.gpu_rollout_tokens}", r["rollout_tps"], "tok/s")
    record("gpu", f"{tag}: rollout MFU", 100 * r["rollout_mfu"], "%")


def lora_figures(args):
    """6. LoRA against full fine-tuning: trainable parameters, step time, peak memory; and on paper at 0.5B and 8B."""
    cfg = tiny_config(args) if args.quick else qwen_config()
    name = "tiny" if args.quick else "qwen2.5-0.5b"
    r = bench_lora(cfg, args.lora_rank, args.lora_len, threads=args.threads)
    tag = f"{name}, 1x{args.lora_len}, fp32"
    for mode in ("full", "lora"):
        what = "full fine-tuning" if mode == "full" else f"LoRA r={args.lora_rank} attn+mlp"
        record("lora", f"{tag}, {what}: trainable", r[f"{mode}_trainable"] / 1e6, "M")
        record("lora", f"{tag}, {what}: step", r[f"{mode}_step_s"], "s")
        record("lora", f"{tag}, {what}: peak RSS", r[f"{mode}_peak_bytes"] / 2 ** 30, "GiB")
    ratio = r["full_peak_bytes"] / r["lora_peak_bytes"]
    # the target holds at the Qwen shape, where weights dominate; the quick run's tiny model is all torch overhead
    record("lora", "peak memory, full / LoRA", ratio, "x", None if args.quick else ">= 2x", None if args.quick else ratio >= 2)
    for name, cfg in (("qwen2.5-0.5b", qwen_config()), ("llama-3.1-8b", llama8b_config())):
        p = lora_plan(cfg, args.lora_rank)
        record("lora", f"{name} on paper: parameters", p["params"] / 1e9, "B")
        record("lora", f"{name}: full fine-tuning, 16 B/param", p["full_bytes"] / 1e9, "GB")
        record("lora", f"{name}: LoRA r={args.lora_rank}, {p['adapters'] / 1e6:.1f}M adapters", p["lora_bytes"] / 1e9, "GB")
        record("lora", f"{name}: same, BK rows trained (--lora_bk)", p["lora_bk_bytes"] / 1e9, "GB")


def trl_figures(args):
    """7. each stage against TRL's trainer, on the CPU (the figures compare the loops, not the devices)."""
    r = bench_trl(args.trl_steps, args.trl_grpo_steps, threads=args.threads)
    what = dict(sft="SFT step, 32 traces", grpo="iteration, 16 x 8 rollouts", dpo="DPO step, 16 pairs")
    for stage, res in r.items():
        ours, theirs = res["ours"], res["trl"]
        record("trl", f"{stage}: ours, {what[stage]}", ours["step_s"] * 1e3, "ms")
        record("trl", f"{stage}: TRL {trl_version()}, same", theirs["step_s"] * 1e3, "ms")
        record("trl", f"{stage}:   TRL forward + backward (+ generation)", theirs["forward_backward_s"] * 1e3, "ms")
        record("trl", f"{stage}:   TRL optimizer step", theirs["optimizer_s"] * 1e3, "ms")
        record("trl", f"{stage}:   TRL outside the step (data, logging)", theirs["outside_s"] * 1e3, "ms")
        if stage == "sft":   # the models alone, on one batch, in one process
            record("trl", "sft:   our model alone: forward + backward", theirs["bare_ours_s"] * 1e3, "ms")
            record("trl", "sft:   the Hugging Face model alone, same batch", theirs["bare_hf_s"] * 1e3, "ms")
            record("trl", "sft:   their losses differ by", abs(theirs["bare_ours_loss"] - theirs["bare_hf_loss"]), "")
        if stage == "grpo":
            for side, x in (("ours", ours), ("TRL", theirs)):
                record("trl", f"grpo:   {side}: generating + scoring", x["generate_s"] * 1e3, "ms")
                record("trl", f"grpo:   {side}: tokens generated", x["tokens"], "tok")
        ratio = theirs["step_s"] / ours["step_s"]
        record("trl", f"{stage}: TRL / ours, step time", ratio, "x", ">= 1x", ratio >= 1)

# -----------------------------------------------------------------------------


def main(argv=None):
    args = Config()   # this run's settings: the command line's, then --quick's counts
    configure(args, sys.argv[1:] if argv is None else argv)
    if args.quick:  # seconds: enough to see every figure, too little to trust the decimals
        args.new_tokens, args.n_rewinds, args.train_batch, args.train_iters, args.reps = 64, 2000, 8, 2, 1
        args.gpt2_small, args.matmul_n = False, 1024
        args.hf_tokens, args.rollout_tokens, args.head_actions, args.sft_steps = 32, 16, 64, 4
        args.trl_steps, args.trl_grpo_steps = 4, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    if "cuda" in args.device:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    want = set(args.sections.split(","))
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    load0 = os.getloadavg()[0]
    print(f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, threads {torch.get_num_threads()}, "
          f"compile {args.compile}, quick {args.quick}, load average {load0:.2f}")
    t_start = time.perf_counter()
    shapes = [("tiny", tiny_config(args))] + ([("gpt2-small", gpt2_config())] if args.gpt2_small else [])

    if "decode" in want:
        decode_figures(args, ptdtype, shapes)
    if "hf" in want:
        hf_figures(args, ptdtype, shapes)
    if "rewind" in want:
        rewind_figures(args, ptdtype)
    if "batch" in want:
        batch_figures(args, ptdtype)
    if "rollout" in want:
        rollout_figures(args, ptdtype)
    if "head" in want:
        head_figures(args)
    if "data" in want:
        data_figures(args)
    peak = train_figures(args, ptdtype) if "train" in want else None
    if "gpu" in want and "cuda" not in args.device:
        print("  gpu     skipped: the 0.5B-model training and rollout figures run with --device=cuda")
    elif "gpu" in want:
        gpu_figures(args, ptdtype, peak)
    if "lora" in want:
        lora_figures(args)
    if "trl" in want and trl_version() is None:
        print("  trl     skipped: TRL is not installed (pip install -r requirements-bench.txt)")
    elif "trl" in want:
        trl_figures(args)

    if "cuda" in args.device:
        record("memory", "peak CUDA memory allocated", torch.cuda.max_memory_allocated() / 2 ** 20, "MiB")
    record("memory", "peak resident memory of this process", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MiB")
    print_table()
    # the 1-minute load average lags; well above zero at the start means other processes shared the
    # cores (--threads) and every figure here is pessimistic, the ratios included
    print(f"\nbench took {time.perf_counter() - t_start:.0f} s; load average at the start {load0:.2f}, now {os.getloadavg()[0]:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(config=asdict(args), torch=torch.__version__, figures=ROWS), f, indent=2)


if __name__ == "__main__":
    main()
