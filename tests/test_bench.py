"""Smoke test of bench.py and its measurements (speed.py): every figure comes out finite and positive on a tiny model.
Speed is never asserted here; the targets are printed by bench.py itself."""
import math

import json

import pytest
import torch

import bench
import speed
from common import configure
from data import Rule, Trace
from model import GPTConfig


def tiny(**kw):
    return GPTConfig(**dict(dict(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=320), **kw))


def check(figures):
    for k, v in figures.items():
        if isinstance(v, bool):
            continue
        assert math.isfinite(v) and v > 0, f"{k} = {v}"


def test_decode():
    model = speed.make_model(tiny())
    check(speed.bench_decode(model, 8, plen=4, reps=1))


def test_rewind():
    r = speed.bench_rewind(tiny(pos="rope", block_size=129), lengths=(8, 128), n=64)
    assert r["in_place"]
    check(r)


def test_batched():
    model = speed.make_model(tiny())
    r = speed.bench_batched(model, rows=2, max_new_tokens=10, plen=4, reps=1)
    assert 0 < r["forced_bk_frac"] < 1
    check(r)


def test_train():
    model = speed.make_model(tiny())
    peak = speed.matmul_peak(128, iters=2)
    r = speed.bench_train(model, batch=2, length=24, iters=1, p=0.5, peak=peak)
    assert r["keep_T"] == 24 and not r["keep_masked"] and r["rewind_masked"]
    check(r)


def test_batched_forced_replays_against_plain_decoding():
    model = speed.make_model(tiny())
    r = speed.bench_batched(model, rows=2, max_new_tokens=12, plen=4, p=0.3, reps=1)
    assert r["forced_plain_tps"] > 0 and r["forced_rewind_tps"] > 0


def test_vs_hugging_face():
    pytest.importorskip("transformers")
    for rows in (1, 3):
        r = speed.bench_vs_hf(tiny(n_embd=64), rows, 6, plen=4, reps=1)
        assert r["same_tokens"]
        check(r)


def test_rollout_bookkeeping_share():
    model = speed.make_model(tiny())
    r = speed.bench_rollout(model, rows=4, new_tokens=6, plen=4, reps=1)
    assert 0 < r["bookkeeping"] < r["overhead"] < 1 and 0 < r["sampler"] and 0 <= r["setup"] < 1
    assert r["model_us"] < r["step_us"]
    # timed through generate's timer hook: nothing under test was patched
    assert "hidden" not in vars(model) and "forward" not in vars(model.lm_head)
    import decode
    assert decode.sample.__name__ == "sample" and decode.shape_logits.__name__ == "shape_logits"


def test_loss_head():
    check(speed.bench_loss_head(n_actions=16, n_embd=16, vocab_size=320, n_vocab=258, reps=1))


def test_sft_data_share():
    r = speed.bench_sft_data(steps=2)
    check({k: v for k, v in r.items() if k not in ("wait_ms", "wait_share")})
    assert r["wait_share"] >= 0


def test_large_model_path_runs_on_cpu_at_a_tiny_size():
    # the CUDA-only section's code path, on a tiny Llama-shaped model
    cfg = tiny(n_head=4, n_kv_head=2, bias=False, qkv_bias=True, norm="rmsnorm", mlp="swiglu", pos="rope",
               vocab_size=320, n_vocab=258, eot_id=256, bk_id=257)
    r = speed.bench_large(cfg, "cpu", torch.float32, batch=2, length=16, rows=2, new_tokens=4, iters=1,
                          peak=1e9)
    check(r)


def test_random_response_is_a_valid_rewind_trace():
    # no token deleted at a slot comes back at that slot, or its training log-prob would be -inf
    import random
    from data import layout
    rng = random.Random(0)
    for _ in range(50):
        resp = speed.random_response(40, 257, 5, 0.4, rng)  # 5 ordinary ids: collisions are likely
        L = layout(Trace(prompt=[1], response=resp), 257, Rule("rewind"))
        assert all(t not in bans for t, bans in zip(L["tgt"], L["bans"]))


def test_configure():
    cfg = speed.Config()
    configure(cfg, ["--quick=True", "--device=cpu", "--rewind_lengths=[8, 16]", "--p_bk=0"])
    assert cfg.quick is True and cfg.device == "cpu"
    assert cfg.rewind_lengths == (8, 16) and cfg.p_bk == 0
    with pytest.raises(SystemExit):
        configure(cfg, ["--no_such_key=1"])
    with pytest.raises(SystemExit):
        configure(cfg, ["--quick=maybe"])


def test_report(tmp_path):
    """bench.py's own run: the sections asked for, each figure recorded with its target, as JSON."""
    out = tmp_path / "bench.json"
    bench.main(["--quick=True", "--sections=decode,rollout", "--gpt2_small=False", "--reps=1", f"--out={out}"])
    figures = json.loads(out.read_text())["figures"]
    assert {f["section"] for f in figures} == {"decode", "rollout", "memory"}
    assert any(f["target"] == "<= 3%" and f["status"] in ("met", "MISSED") for f in figures)


def test_lora_plan_and_step():
    c = tiny()
    p = speed.lora_plan(c, 4)
    # rank 4 on c_attn (32 -> 96), attn.c_proj (32 -> 32), c_fc (32 -> 128), mlp.c_proj (128 -> 32)
    assert p["adapters"] == 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert p["full_bytes"] == 16 * p["params"] and p["lora_bytes"] == 4 * p["params"] + 16 * p["adapters"]
    r = speed.bench_lora(c, rank=4, length=16, steps=2, threads=1)
    check(r)
    assert r["lora_trainable"] == p["adapters"] and r["full_trainable"] == p["params"]


def test_trl_comparison_setup_and_our_side(tmp_path):
    """The section against TRL (vs_trl.py) without TRL installed: the shared starting point, the
    labels TRL trains on, which must be our `keep` objective (the Hugging Face model's own loss on them
    equals ours on the same traces), and our three loops timed from their metrics logs."""
    import transformers
    import vs_trl
    from data import collate, layout
    from model import GPT, sft_loss
    d = str(tmp_path)
    vs_trl.write_setup(d, n_traces=48, n_pairs=32)
    lines = [json.loads(line) for line in open(tmp_path / "traces.jsonl")]
    examples = [vs_trl.trl_labels(t, 257) for t in lines]
    masked = 0
    for t, ex in zip(lines, examples):
        assert ex["input_ids"] == t["prompt"] + t["response"] and len(ex["labels"]) == len(ex["input_ids"])
        assert all(y in (-100, x) for x, y in zip(ex["input_ids"], ex["labels"]))
        masked += sum(y == -100 for y in ex["labels"][len(t["prompt"]):])
    assert masked > 0   # error tokens carry no loss on TRL's side either
    # the same loss: TRL's batch shape (right-padded, -100 beyond each row) through transformers. Equal up
    # to the bans: ours renormalises over what decoding may draw (no BK on an empty response), TRL cannot
    T = max(len(ex["input_ids"]) for ex in examples)
    pad = lambda xs, v: [x + [v] * (T - len(x)) for x in xs]
    ids = torch.tensor(pad([ex["input_ids"] for ex in examples], 256))
    labels = torch.tensor(pad([ex["labels"] for ex in examples], -100))
    mask = torch.tensor(pad([[1] * len(ex["input_ids"]) for ex in examples], 0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ours = GPT.from_pretrained(str(tmp_path / "ours")).eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        mine = sft_loss(ours, collate([layout(Trace(t["prompt"], t["response"]), 257, Rule("keep")) for t in lines])).item()
    assert abs(theirs - mine) < 1e-3 * mine
    for stage in ("sft", "grpo", "dpo"):
        r = vs_trl.run_ours(d, stage, 3, threads=1)
        check(r)
