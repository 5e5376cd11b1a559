"""
The measurements behind bench.py: each function times one thing against its baseline, in the same
process, and returns the figures; bench.py runs them by section and prints the report with the
targets. Config holds the settings of a run (bench.py applies the command line to one); each
measurement takes what it needs of them as arguments.
"""
import dataclasses
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from augment import build_traces
from common import step_seed
from data import Batch, Prefetch, Rule, Trace, collate, layout
from hf import padded_vocab
from decode import generate, replay
from model import GPT, GPTConfig, KVCache, add_lora, lora_modules, sft_loss
from tasks import get_task
from tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
# config: --key=value overrides of these fields


@dataclass
class Config:
    device: str = "cpu"
    dtype: str = "float32"          # float32 | bfloat16 | float16 (decode runs in it; training autocasts to it)
    compile: bool = False            # torch.compile the model for training (generate's step loop stays eager)
    quick: bool = False              # smoke run: small counts, no GPT-2 small shape
    seed: int = 1337
    threads: int = 0                 # torch.set_num_threads; 0 keeps torch's default. On a shared machine, 2 OpenMP
                                     # threads stall at every barrier when a core is taken; --threads=1 (or
                                     # OMP_WAIT_POLICY=PASSIVE) keeps the ratios meaningful there
    out: str = ""                   # also write the figures as JSON here
    sections: str = "decode,hf,rewind,batch,rollout,head,data,train,gpu,lora,trl"   # which sections to run
    # the default tiny model: the shape train_sft.py trains from scratch with the byte tokenizer, with
    # block_size raised from its 128 so that 256 new tokens fit (wpe's size costs no speed)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    block_size: int = 512
    vocab_size: int = 320
    n_vocab: int = 258
    eot_id: int = 256
    bk_id: int = 257
    gpt2_small: bool = True          # also time GPT-2 small (124M): decode (the no-cache loop takes ~1 min) and batching
    gpt2_batch_tokens: int = 32     # new tokens per row for GPT-2 small's batched vs sequential figure
    # workloads
    prompt_len: int = 16
    new_tokens: int = 256           # decode length for figures 1 and 3
    rewind_lengths: tuple = (64, 4096)
    n_rewinds: int = 20000
    batch_rows: int = 16
    p_bk: float = 0.15                # chance of a BK at each response step of the random training traces
    forced_bk: float = 0.2            # the same for the forced decoding traces of the batch section
    hf_tokens: int = 256            # new tokens per row against Hugging Face generate (tiny shape)
    hf_gpt2_tokens: int = 256       # the same at GPT-2 small (each Hugging Face batch-16 run is ~40 s)
    rollout_rows: int = 64
    rollout_tokens: int = 96        # train_grpo.py's default max_new_tokens
    head_actions: int = 256         # actions scored by the loss-head figure (each pass ~1 s at 50304)
    sft_steps: int = 20             # default SFT steps timed for the data-preparation share
    gpu_batch: int = 8              # CUDA only: the Qwen2.5-0.5B-shaped model's training batch (x gpu_len)
    gpu_len: int = 1024
    gpu_rollout_rows: int = 64
    gpu_rollout_tokens: int = 256
    train_batch: int = 32
    train_len: int = 128            # nodes per row of the `keep` layout (prompt + response incl. BKs)
    train_iters: int = 4
    reps: int = 3                   # timings are the best of reps runs: contention on a shared machine only adds time
    matmul_n: int = 2048
    lora_rank: int = 16             # the LoRA section's adapter rank
    lora_len: int = 256             # tokens in its one training sequence
    trl_steps: int = 12             # steps of each side's SFT and DPO loop against TRL (the first two are not timed)
    trl_grpo_steps: int = 6         # the same for GRPO, whose iterations take seconds


SEED = Config.seed   # the measurements' default seed, the run's

# -----------------------------------------------------------------------------


def sync(dev):
    if str(dev).startswith("cuda"):
        torch.cuda.synchronize()


def clock(dev):
    """A timestamp that waits for queued GPU work first, so a CUDA interval is the real one."""
    sync(dev)
    return time.perf_counter()


def best_of(fn, reps, dev="cpu"):
    """Shortest wall time of reps calls: the machine may be shared, and contention only ever adds
    time, so the minimum is the least noisy estimate of what the code itself costs."""
    best = math.inf
    for _ in range(max(1, reps)):
        t0 = clock(dev)
        fn()
        best = min(best, clock(dev) - t0)
    return best


def tiny_config(run, **kw):
    """The tiny model's shape in the run's Config, with kw on top."""
    return GPTConfig(**dict(dict(n_layer=run.n_layer, n_head=run.n_head, n_embd=run.n_embd, block_size=run.block_size,
                                 vocab_size=run.vocab_size, n_vocab=run.n_vocab, eot_id=run.eot_id, bk_id=run.bk_id), **kw))


def gpt2_config():
    # GPT-2 small as loaded from Hugging Face: EOT is GPT-2's 50256, BK takes the new id 50257,
    # and the table is padded to 50304
    return GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304,
                     n_vocab=50258, eot_id=50256, bk_id=50257)


def make_model(cfg, dev="cpu", ptdtype=torch.float32, seed=SEED):
    torch.manual_seed(seed)
    return GPT(cfg).to(device=dev, dtype=ptdtype).eval()


def random_prompts(rows, length, n_tok, rng):
    return [[rng.randrange(n_tok) for _ in range(length)] for _ in range(rows)]


def random_response(n, bk, n_tok, p, rng):
    """Up to n actions: a BK with chance p whenever something can be deleted, else an ordinary
    token. The trace obeys the `rewind` bans (a token deleted at a slot is not produced there
    again), as a sampled trace does; a banned action has log-prob -inf, and the loss would be inf
    or NaN. When every ordinary token is banned at a slot it must backtrack, or at the prompt it
    ends early, as generate ends such a row."""
    out, stack, bans = [], [], {}   # bans: stack depth -> tokens deleted while acting at that depth
    for _ in range(n):
        banned = bans.get(len(stack), ())
        if stack and (rng.random() < p or len(banned) >= n_tok):
            out.append(bk)
            bans.pop(len(stack), None)
            bans.setdefault(len(stack) - 1, set()).add(stack.pop())
        elif len(banned) < n_tok:
            t = rng.randrange(n_tok)
            while t in banned:
                t = rng.randrange(n_tok)
            out.append(t)
            stack.append(t)
        else:
            break
    return out

# -----------------------------------------------------------------------------
# 1. decode with and without the KV cache


@torch.no_grad()
def decode_nocache(model, prompt, max_new_tokens, temperature=1.0, gen=None):
    """nanoGPT's generate: re-run the whole sequence every step. Only the last position goes
    through lm_head, as nanoGPT's forward does at inference, so the baseline is not inflated
    by projecting every position onto a large vocabulary."""
    cfg = model.config
    idx = torch.tensor([prompt], device=next(model.parameters()).device)
    for _ in range(max_new_tokens):
        logits = model.lm_head(model.hidden(idx)[:, -1])[:, :cfg.n_vocab]  # padding ids are never sampled
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen)
        idx = torch.cat((idx, nxt), dim=1)
    return idx


def bench_decode(model, max_new_tokens, plen=16, reps=3, nocache_reps=1, seed=SEED):
    """Batch-1 decode tokens/s, KV cache (decode.generate, policy keep) vs full re-forward."""
    dev = next(model.parameters()).device
    rng = random.Random(seed)
    prompt = random_prompts(1, plen, model.config.eot_id, rng)[0]
    gen = torch.Generator(device=dev).manual_seed(seed)
    # warm up both paths: first calls pay for allocator growth and kernel selection
    generate(model, [prompt], max_new_tokens=8, rule=Rule("keep"), stop_at_eot=False, seed=seed)
    decode_nocache(model, prompt, 8, gen=gen)
    best = best_of(lambda: generate(model, [prompt], max_new_tokens=max_new_tokens, rule=Rule("keep"),
                                    stop_at_eot=False, seed=seed), reps, dev)
    t_nc = best_of(lambda: decode_nocache(model, prompt, max_new_tokens, gen=gen), nocache_reps, dev)
    return dict(cache_tps=max_new_tokens / best, nocache_tps=max_new_tokens / t_nc,
                cache_ms_per_tok=1e3 * best / max_new_tokens, nocache_ms_per_tok=1e3 * t_nc / max_new_tokens)

# -----------------------------------------------------------------------------
# 1b. decode against Hugging Face generate


@torch.no_grad()
def bench_vs_hf(cfg, rows, new_tokens, plen=16, reps=3, dev="cpu", ptdtype=torch.float32, seed=SEED):
    """Greedy decode of `rows` prompts, `new_tokens` each (no early stop), by decode.generate and by
    Hugging Face's generate on the same weights (export_hf, then transformers reads the folder);
    the tokens must agree. Returns tokens/s of each, or None without transformers (test-only)."""
    try:
        import transformers
    except ImportError:
        return None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = make_model(cfg, dev, ptdtype, seed)
    # generate bans BK and the table padding, Hugging Face does not: zero rows give those ids
    # logit 0, far below the top of a random model's logits, so greedy never picks them
    model.transformer.wte.weight[cfg.n_vocab:] = 0
    model.transformer.wte.weight[cfg.bk_id] = 0
    with tempfile.TemporaryDirectory() as d:
        model.export_hf(d)
        ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=ptdtype).to(dev).eval()
    ref.generation_config.eos_token_id = None   # a fixed number of new tokens, like stop_at_eot=False
    ref.generation_config.pad_token_id = cfg.eot_id
    prompts = random_prompts(rows, plen, cfg.eot_id, random.Random(seed))
    ids = torch.tensor(prompts, device=dev)
    ours = lambda: generate(model, prompts, max_new_tokens=new_tokens, temperature=0, rule=Rule("keep"),
                            stop_at_eot=False)
    theirs = lambda: ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  do_sample=False)
    a, b = ours(), theirs()   # warm-up (CPU decoding makes its weight copies here, once)
    t_ours = t_hf = math.inf
    for _ in range(max(1, reps)):   # interleaved, so that a change of load hits both
        t_ours = min(t_ours, best_of(ours, 1, dev))
        t_hf = min(t_hf, best_of(theirs, 1, dev))
    n = rows * new_tokens
    return dict(ours_tps=n / t_ours, hf_tps=n / t_hf, same_tokens=[o["response"] for o in a] == b[:, plen:].tolist())

# -----------------------------------------------------------------------------
# 2. the cost of a rewind


@torch.no_grad()
def bench_rewind(cfg, lengths=(64, 4096), n=20000, dev="cpu", ptdtype=torch.float32, chunk=64, seed=SEED):
    """Per-rewind microseconds of KVCache.rewind on one row at each cache length, and of a
    rewind-decode step (rewind + the next logits read from the stored hidden state), beside a
    normal one-token decode step at the same length. The cache contents do not change the cost
    of any of these, so the cache is filled by setting lengths, not by a prefill."""
    model = make_model(cfg, dev, ptdtype, seed)
    cache = KVCache(cfg, 1, max(lengths) + 1, device=dev, dtype=ptdtype)
    rows = torch.tensor([0], device=dev)
    tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
    ptrs = (cache.k.data_ptr(), cache.v.data_ptr(), cache.h.data_ptr())
    res = dict(kv_bytes_per_token=(cache.k[:, 0, :, 0].numel() * 2 + cache.h[0, 0].numel()) * cache.k.element_size())

    def per_call_us(step, total, L=None, k=chunk):
        # chunks of k calls (k rewinds down from L, the length put back between chunks, so a
        # length-64 cache never runs dry and both lengths do identical work); the best chunk
        # is the figure, for the machine may be shared
        best = math.inf
        for _ in range(max(2, total // k)):
            if L is not None:
                cache.lengths.fill_(L)
            t0 = clock(dev)
            for _ in range(k):
                step()
            best = min(best, clock(dev) - t0)
        return 1e6 * best / k

    def rewind():
        cache.pop(rows)

    def rewind_logits():
        # what generate does after a BK: the slot below acts again from its stored hidden state
        cache.pop(rows)
        return model.lm_head(cache.h[rows, cache.lengths[rows]])

    for L in lengths:
        per_call_us(rewind, chunk * 4, L)  # warm-up
        res[f"rewind_us_{L}"] = per_call_us(rewind, n, L)
        res[f"rewind_step_us_{L}"] = per_call_us(rewind_logits, n // 4, L, min(chunk, L))
        # for scale, a normal decode step at length L: writes slot L, attends over L + 1 slots
        cache.lengths.fill_(L)
        pos = cache.lengths.view(1, 1).clone()
        decode = lambda: model.lm_head(model.hidden(tok, pos, cache=cache)[:, -1])
        per_call_us(decode, 3, k=1)
        res[f"decode_step_us_{L}"] = per_call_us(decode, max(20, n // 200), k=5)
    res["in_place"] = ptrs == (cache.k.data_ptr(), cache.v.data_ptr(), cache.h.data_ptr())
    return res

# -----------------------------------------------------------------------------
# 3. many rows in one cache


@torch.no_grad()
def bench_batched(model, rows=16, max_new_tokens=256, plen=16, p=0.15, reps=2, forced=True, seed=SEED):
    """Sampled decode of `rows` prompts in one cache vs the same prompts one by one (same number
    of tokens), then batched replays of random traces with BKs under each policy."""
    dev = next(model.parameters()).device
    cfg = model.config
    rng = random.Random(seed)
    prompts = random_prompts(rows, plen, cfg.eot_id, rng)
    kw = dict(max_new_tokens=max_new_tokens, temperature=1.0, stop_at_eot=False, seed=seed, rule=Rule("keep"))
    generate(model, prompts, **dict(kw, max_new_tokens=8))  # warm-up
    generate(model, prompts[:1], **dict(kw, max_new_tokens=8))
    t_batch = best_of(lambda: generate(model, prompts, **kw), reps, dev)
    t_seq = sum(best_of(lambda: generate(model, [pr], **kw), reps, dev) for pr in prompts)
    n_tok = rows * max_new_tokens  # stop_at_eot=False: every row makes all its tokens
    res = dict(batch_tps=n_tok / t_batch, seq_tps=n_tok / t_seq)
    # the ceiling that generate's bookkeeping cannot beat: one bare cached forward step (hidden +
    # lm_head) of `rows` rows vs of one row, mid-way through the response
    steps = {}
    for B in (1, rows):
        cache = KVCache(cfg, B, plen + max_new_tokens + 1, device=dev, dtype=next(model.parameters()).dtype)
        tok = torch.zeros(B, 1, dtype=torch.long, device=dev)
        pos = torch.full((B, 1), plen + max_new_tokens // 2, device=dev)
        step = lambda: model.lm_head(model.hidden(tok, pos, cache=cache)[:, -1])
        step()
        steps[B] = best_of(lambda: [step() for _ in range(5)], 3 * reps, dev) / 5
    res["forward_ceiling"] = rows * steps[1] / steps[rows]
    if not forced:
        return res
    # forced traces: every row backtracks at its own steps, so under `rewind` rows shrink and grow
    # independently while under `keep` the BKs are written like any token.
    # max_new_tokens must cover the traces: generate sizes the cache from it, not from force.
    # "plain" replays traces of the same lengths without a BK: decoding that never backtracks.
    force = [random_response(max_new_tokens, cfg.bk_id, cfg.eot_id, p, rng) for _ in range(rows)]
    plain = [random_response(len(f), cfg.bk_id, cfg.eot_id, 0.0, rng) for f in force]
    n_act = sum(len(f) for f in force)
    runs = dict(keep=("keep", force), rewind=("rewind", force), plain=("rewind", plain))
    run = lambda name: replay(model, prompts, runs[name][1], Rule(runs[name][0]))
    for name in runs:
        assert all(o["response"] == f for o, f in zip(run(name), runs[name][1])), "a forced row ended early"
    t = {name: math.inf for name in runs}
    for _ in range(max(1, reps)):   # interleaved: the rewind / plain ratio is the figure
        for name in runs:
            t[name] = min(t[name], best_of(lambda: run(name), 1, dev))
    for name in runs:
        res[f"forced_{name}_tps"] = n_act / t[name]
    res["forced_bk_frac"] = sum(f.count(cfg.bk_id) for f in force) / n_act
    return res


class Phases:
    """A timer for decode.generate(timer=...): the (start, end) of every span of each phase the
    decoder enters it for ("prefill", "model", "sampler"), by the device's clock. A plain context
    manager, not a generator one: entering and leaving cost a third as much, and what they cost
    outside the spans is counted as bookkeeping."""

    def __init__(self, dev):
        self.dev = dev
        self.spans = {"prefill": [], "model": [], "sampler": []}

    def __call__(self, phase):
        self.phase = phase   # (phases never nest)
        return self

    def __enter__(self):
        self.t0 = clock(self.dev)

    def __exit__(self, *exc):
        self.spans[self.phase].append((self.t0, clock(self.dev)))


@torch.no_grad()
def bench_rollout(model, rows=64, new_tokens=96, plen=16, reps=3, seed=SEED):
    """Where a sampled rollout step of `rows` rows (policy rewind, slot bans, a backtrack cap, a stop
    at end-of-text: what train_grpo.py runs) spends its time, each part timed inside the same
    generate call by its timer (Phases): the model (every forward and the head), the sampler
    (shape_logits and decode.sample: the log-softmax and the inverse-CDF draw), and generate's own
    bookkeeping, the rest (stacks, bans, caps, finished rows, the recorded log-probs). Shares are
    taken over the decode loop, from the first step's logits to the last forward; the call's setup
    (cache allocation, prompt tensors, prefill) and final transfer are reported apart. The run with
    the shortest loop is reported."""
    dev = next(model.parameters()).device
    prompts = random_prompts(rows, plen, model.config.eot_id, random.Random(seed))
    kw = dict(max_new_tokens=new_tokens, temperature=1.0, rule=Rule("rewind"), max_backtracks=4, stop_at_eot=True,
              seed=seed)
    # a random model almost never backtracks: steer its last hidden state towards BK (tied
    # embeddings), so that rows pop and get slot bans in most steps, as an SFT model's do
    cfg = model.config
    u = torch.nn.functional.normalize(torch.randn(cfg.n_embd, generator=torch.Generator().manual_seed(seed)), dim=0)
    model.transformer.ln_f.bias.copy_(u.to(model.transformer.ln_f.bias))
    model.transformer.wte.weight[cfg.bk_id] = 3.0 * u.to(model.transformer.wte.weight)
    out = generate(model, prompts, **kw)   # warm-up
    n_bk = sum(o["response"].count(cfg.bk_id) for o in out) / sum(len(o["response"]) for o in out)
    best = None
    for _ in range(max(1, reps)):
        timer = Phases(dev)
        t0 = clock(dev)
        generate(model, prompts, **kw, timer=timer)
        total = clock(dev) - t0
        (prefill,), loop = timer.spans["prefill"], timer.spans["model"]   # a head and a forward per step
        window = loop[-1][1] - loop[0][0]
        inside = sum(b - a for a, b in loop)
        sampler = sum(b - a for a, b in timer.spans["sampler"])
        steps = len(timer.spans["sampler"])   # (rows that end early leave the loop running: all rarely do)
        r = dict(step_us=1e6 * window / steps, model_us=1e6 * inside / steps, bk_share=n_bk,
                 overhead=(window - inside) / window, sampler=sampler / window,
                 bookkeeping=(window - inside - sampler) / window,
                 setup=(total - window - (prefill[1] - prefill[0])) / total)
        best = r if best is None or r["step_us"] < best["step_us"] else best
    return best

# -----------------------------------------------------------------------------
# 4. training throughput


def matmul_peak(n=2048, dev="cpu", ptdtype=torch.float32, iters=5):
    """FLOP/s of one large square matmul: the machine's practical peak for MFU."""
    a = torch.randn(n, n, device=dev, dtype=ptdtype)
    b = torch.randn(n, n, device=dev, dtype=ptdtype)
    for _ in range(2):
        a @ b
    return 2 * n ** 3 / best_of(lambda: a @ b, iters, dev)


def train_traces(batch, length, bk, n_tok, p, rng, plen=16):
    # a trace whose `keep` layout is exactly `length` nodes (BKs are nodes there; the last action
    # is not, nothing acts from it); its `rewind` layout drops the BKs and keeps the errors as
    # side branches
    return [Trace(prompt=random_prompts(1, plen, n_tok, rng)[0],
                  response=random_response(length - plen + 1, bk, n_tok, p, rng)) for _ in range(batch)]


def flops_per_token(model, T):
    # nanoGPT's estimate_mfu: 6N for the matmuls (forward + backward) plus the attention scores
    cfg = model.config
    return 6 * model.num_params() + 12 * cfg.n_layer * cfg.n_embd * T


def bench_train(model, batch=32, length=128, iters=4, p=0.15, peak=None, ptdtype=torch.float32, use_compile=False,
                seed=SEED):
    """Forward + backward + AdamW step tokens/s for each policy's layout of the same traces.
    Tokens are the B x T nodes the forward processes (padding included, as the model pays for it)."""
    dev = next(model.parameters()).device
    dt = str(dev).split(":")[0]
    cfg = model.config
    rng = random.Random(seed)
    traces = train_traces(batch, length, cfg.bk_id, cfg.eot_id, p, rng)
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=dt, dtype=ptdtype)
    scaler = torch.amp.GradScaler(dt, enabled=(ptdtype == torch.float16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    # sft_loss goes through model.forward, so a compiled wrapper is what the loss calls
    fwd = torch.compile(model) if use_compile else model
    model.train()
    res = {}
    for policy in ("keep", "rewind"):
        # data prep on its own clock: layout per trace, then collate into tensors
        lays = [layout(t, cfg.bk_id, Rule(policy)) for t in traces]
        t_layout = best_of(lambda: [layout(t, cfg.bk_id, Rule(policy)) for t in traces], 3)
        t_collate = best_of(lambda: collate(lays, device=dev), 3, dev)
        b = collate(lays, device=dev)
        assert policy == "rewind" or b.mask is None, "keep must take the mask=None fast path"
        B, T = b.ids.shape

        def step():
            with ctx:
                loss = sft_loss(fwd, b)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            return loss

        for _ in range(2 if use_compile else 1):  # warm-up (and compile)
            loss = step()
        assert math.isfinite(loss.item()), f"{policy}: loss is {loss.item()}"
        t_step = best_of(step, iters, dev)
        tps = B * T / t_step
        res[f"{policy}_T"] = T
        res[f"{policy}_masked"] = b.mask is not None
        res[f"{policy}_real_tps"] = sum(len(L["ids"]) for L in lays) / t_step  # without the padding
        res[f"{policy}_tps"] = tps
        res[f"{policy}_step_ms"] = 1e3 * t_step
        res[f"{policy}_layout_ms"] = 1e3 * t_layout
        res[f"{policy}_collate_ms"] = 1e3 * t_collate
        res[f"{policy}_flops"] = flops_per_token(model, T) * tps
        if peak:
            res[f"{policy}_mfu"] = res[f"{policy}_flops"] / peak
    model.eval()
    return res

# -----------------------------------------------------------------------------
# 4b. the loss head and the data pipeline


class HeadOnly(torch.nn.Module):
    """A model that is an lm_head over fixed hidden states (a parameter, so the backward reaches them
    as it would reach the transformer): what sft_loss costs beyond the transformer."""

    def __init__(self, h, vocab_size, n_vocab):
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab_size, n_vocab=n_vocab, n_embd=h.shape[-1])
        self.h = torch.nn.Parameter(h)
        self.lm_head = torch.nn.Linear(h.shape[-1], vocab_size, bias=False)

    def forward(self, idx, pos=None, mask=None, act=None):
        return self.lm_head(self.h[act[0], act[1]])


def bench_loss_head(n_actions=256, n_embd=768, vocab_size=50304, n_vocab=50258, reps=3, dev="cpu", p=0.2, seed=SEED):
    """Forward + backward of the SFT loss head (model.sft_loss: lm_head on the acting nodes only,
    bans written sparsely, one fused cross-entropy) against lm_head + F.cross_entropy on the same
    hidden states, at GPT-2's vocabulary, on the actions of random `rewind` traces with bans (a BK
    with chance p at each step)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    bk = n_vocab - 1
    lays = []
    while sum(len(L["tgt"]) for L in lays) < n_actions:
        t = Trace(random_prompts(1, 16, bk, rng)[0], random_response(48, bk, bk, p, rng))
        lays.append(layout(t, bk, Rule("rewind")))
    batch = collate(lays, device=dev)
    head = HeadOnly(torch.randn(*batch.ids.shape, n_embd), vocab_size, n_vocab).to(dev)
    act = (batch.act_row, batch.act_src)

    def ours():
        sft_loss(head, batch).backward()

    def plain():
        F.cross_entropy(head.lm_head(head.h[act]), batch.tgt).backward()

    ours(), plain()
    t_ours = t_plain = math.inf
    for _ in range(max(1, reps)):   # interleaved
        t_ours = min(t_ours, best_of(ours, 1, dev))
        t_plain = min(t_plain, best_of(plain, 1, dev))
    return dict(head_ms=1e3 * t_ours, plain_ms=1e3 * t_plain, n_actions=len(batch.tgt),
                n_bans=len(batch.ban_tok))


def bench_sft_data(steps=20, dev="cpu", seed=SEED):
    """Data preparation against the default SFT step (train_sft.py's defaults: arith problems in
    byte tokens, 32 traces half with backtracks, the `rewind` layout, a 4 x 192 model, AdamW), at
    the curriculum's last phase (3 backtracks). Returns the time one step's data takes to build
    (what a loop without prefetching waits), and the time the loop waits with data.Prefetch
    building it on a background thread, as train_sft.py's loop does, each over the step's wall time.
    The first prefetched step is left out: its data cannot be built ahead, once per run."""
    tok, task = get_tokenizer("byte"), get_task("arith")
    pool = task.problems("train", n=50000, seed=seed)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=128, vocab_size=padded_vocab(tok.n_vocab), n_vocab=tok.n_vocab,
                          eot_id=tok.eot_id, bk_id=tok.bk_id, n_layer=4, n_head=4, n_embd=192)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.99), weight_decay=0.1)

    def make(step):   # train_sft.global_batch + micro_batches, with its checks
        rng = random.Random(step_seed(seed, step))   # as train_sft.global_batch draws it
        traces = build_traces(tok, task, [pool[rng.randrange(len(pool))] for _ in range(32)], rng,
                              backtrack_ratio=0.5, max_backtracks=3, augment="plausible")
        lays = [layout(t, tok.bk_id, Rule("rewind")) for t in traces]
        assert not any(w > 0 and t in b for L in lays for t, w, b in zip(L["tgt"], L["weight"], L["bans"]))
        return collate(lays, device=dev)

    def train(batch):
        sft_loss(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    train(make(0))   # warm-up
    t_data = t_step = 0.0
    for step in range(steps):   # inline: each step builds its data, then trains
        t0 = clock(dev)
        batch = make(step)
        t1 = clock(dev)
        train(batch)
        t_data, t_step = t_data + t1 - t0, t_step + clock(dev) - t0
    data = Prefetch(make, range(steps + 1))
    train(next(data))
    waited, t0 = data.waited, clock(dev)
    for batch in data:
        train(batch)
    t_pf = clock(dev) - t0
    waited = data.waited - waited
    data.close()
    return dict(data_ms=1e3 * t_data / steps, step_ms=1e3 * t_step / steps, inline_share=t_data / t_step,
                prefetch_step_ms=1e3 * t_pf / steps, wait_ms=1e3 * waited / steps, wait_share=waited / t_pf)

# -----------------------------------------------------------------------------
# 5. a 0.5B model on a GPU


def qwen_config():
    # Qwen2.5-0.5B's shape (random weights): GQA 14/2 heads, SwiGLU, qkv bias, RoPE, tied 151936-row table
    return GPTConfig(block_size=4096, vocab_size=151936, n_vocab=151666, eot_id=151643, bk_id=151665, n_layer=24,
                     n_head=14, n_kv_head=2, n_embd=896, n_inner=4864, bias=False, qkv_bias=True, norm="rmsnorm",
                     norm_eps=1e-6, mlp="swiglu", pos="rope", rope_theta=1e6, tie_embeddings=True)


def causal_batch(cfg, B, T, dev="cpu"):
    """A data.Batch of B random sequences of T tokens, every next token a target and no bans:
    plain causal LM training, for the sections that time a step at a large shape."""
    ids = torch.randint(0, cfg.eot_id, (B, T), device=dev)
    act_row, act_src = torch.arange(B, device=dev).repeat_interleave(T - 1), torch.arange(T - 1, device=dev).repeat(B)
    n = B * (T - 1)
    return Batch(ids=ids, pos=torch.arange(T, device=dev).expand(B, T), mask=None, act_row=act_row, act_src=act_src,
                 tgt=ids[act_row, act_src + 1], weight=torch.ones(n, device=dev), wrong=torch.full((n,), -1.0, device=dev),
                 ban_act=torch.zeros(0, dtype=torch.long, device=dev), ban_tok=torch.zeros(0, dtype=torch.long, device=dev),
                 n_tokens=B * T)


def bench_large(cfg, dev, ptdtype, batch=8, length=1024, rows=64, new_tokens=256, iters=5, peak=None, seed=SEED):
    """Training (causal LM loss through sft_loss, autocast to ptdtype, AdamW) and rollout (sampled
    generate under `rewind`, weights cast to ptdtype) tokens/s and MFU against `peak`, for a random
    model of config cfg. Written for CUDA; main() runs it only there."""
    torch.manual_seed(seed)
    model = GPT(cfg).to(dev)
    dt = str(dev).split(":")[0]
    B, T = batch, length
    lm = causal_batch(cfg, B, T, dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=dt, dtype=ptdtype)

    def step():
        with ctx:
            loss = sft_loss(model, lm)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t = best_of(step, iters, dev)
    res = dict(params=model.num_params(), train_tps=B * T / t)
    res["train_mfu"] = flops_per_token(model, T) * res["train_tps"] / peak if peak else 0.0
    del opt
    model = model.to(ptdtype).eval()
    prompts = random_prompts(rows, 16, cfg.eot_id, random.Random(seed))
    roll = lambda: generate(model, prompts, max_new_tokens=new_tokens, temperature=1.0, rule=Rule("rewind"),
                            max_backtracks=4, stop_at_eot=False, seed=seed)
    roll()
    t = best_of(roll, 2, dev)
    res["rollout_tps"] = rows * new_tokens / t
    # a decoded token: 2 FLOPs per weight, plus the attention over the ~16 + new_tokens / 2 slots
    per_token = 2 * model.num_params() + 4 * cfg.n_layer * cfg.n_head * cfg.head_dim * (16 + new_tokens / 2)
    res["rollout_mfu"] = per_token * res["rollout_tps"] / peak if peak else 0.0
    return res

# -----------------------------------------------------------------------------
# 6. LoRA against full fine-tuning: what trains, and what a step holds in memory


def llama8b_config():
    # Llama-3.1-8B's shape: 32 layers, GQA 32/8 heads, SwiGLU 14336, untied 128256-row tables
    return GPTConfig(block_size=8192, vocab_size=128256, n_vocab=128256, eot_id=128009, bk_id=128255, n_layer=32,
                     n_head=32, n_kv_head=8, n_embd=4096, n_inner=14336, bias=False, norm="rmsnorm", norm_eps=1e-5,
                     mlp="swiglu", pos="rope", rope_theta=5e5, tie_embeddings=False)


def lora_plan(cfg, rank, targets="attn,mlp"):
    """Parameter counts of full fine-tuning and of LoRA at `rank` (with and without the BK rows'
    tables), from a model built on the meta device (no memory), and the bytes a training step
    holds for them as train_sft.py trains: fp32 weights, and for each trainable parameter an fp32
    gradient and AdamW's two fp32 moments (16 bytes), a frozen one 4. Activations come on top."""
    with torch.device("meta"):
        m = GPT(dataclasses.replace(cfg, lora_rank=0))   # add_lora records the rank on the model's config
        total = sum(p.numel() for p in m.parameters())
        add_lora(m, rank, 2.0 * rank, targets)
    adapters = sum(p.numel() for _, l in lora_modules(m) for p in l.parameters())
    tables = {id(m.transformer.wte.weight): m.transformer.wte.weight, id(m.lm_head.weight): m.lm_head.weight}
    table = sum(t.numel() for t in tables.values())
    return dict(params=total, adapters=adapters, tables=table, full_bytes=16 * total,
                lora_bytes=4 * total + 16 * adapters, lora_bk_bytes=4 * (total - table) + 16 * (adapters + table))


def _lora_step(job):
    """Run in a child process (so its peak memory is its own): `steps` SFT steps of a random model on
    one causal sequence, fully or through rank-`rank` adapters; prints trainable parameters, the
    best step's seconds and the process's peak RSS as one JSON line."""
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    cfg = GPTConfig(**{**job["cfg"], "lora_rank": 0})
    model = GPT(cfg)
    if job["lora"]:
        for p in model.parameters():
            p.requires_grad_(False)
        add_lora(model, job["rank"], 2.0 * job["rank"], "attn,mlp")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    lm = causal_batch(cfg, 1, job["length"])

    def step():
        sft_loss(model, lm).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()   # the first step allocates AdamW's moments; the timed ones reuse them
    t = best_of(step, job["steps"] - 1)
    assert job["lora"] == bool(lora_modules(model))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(trainable=sum(p.numel() for p in params), step_s=t, peak=peak)))


def bench_lora(cfg, rank=16, length=256, steps=2, threads=0):
    """Trainable parameters, step time and peak resident memory of a full fine-tuning step and of
    a LoRA step on the same model shape, each in a fresh Python process started from this file's
    folder (a fork would share the parent's pages, and multiprocessing's spawn re-imports the
    caller's __main__). Peak RSS includes the ~0.3 GB torch itself takes."""
    res = {}
    for mode in ("full", "lora"):
        job = dict(cfg=dataclasses.asdict(cfg), rank=rank, length=length, steps=steps, lora=mode == "lora",
                   threads=threads or torch.get_num_threads())
        out = subprocess.run([sys.executable, "-c", "import json, sys, speed; speed._lora_step(json.loads(sys.argv[1]))",
                              json.dumps(job)], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        res.update({f"{mode}_trainable": r["trainable"], f"{mode}_step_s": r["step_s"], f"{mode}_peak_bytes": r["peak"]})
    return res
