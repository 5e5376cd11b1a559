"""train_sft.py: DDP equals one process, resume is exact, a NaN stops the run without touching the
last checkpoint, embedding-only moves nothing but the backtrack rows, and generate.py uses the result."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, only_bk_rows_moved
import train_sft
from data import read_traces
from model import GPT, GPTConfig

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=128", "--n_train=200", "--eval_n=4",
        "--max_new_tokens=8", "--log_interval=1", "--progress=False", "--warmup_iters=2", "--lr=3e-3"]


def run_sft(out, *args):
    train_sft.main(TINY + [f"--out_dir={out}", *args])


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(l) for l in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, rows


def test_resume_is_exact(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    cfg = ["--max_iters=8", "--eval_interval=0", "--save_interval=100"]
    run_sft(full, *cfg)
    run_sft(part, *cfg, "--stop_at=4")           # interrupted after step 4 (checkpoint written there)
    assert GPT.from_pretrained(part).meta["step"] == 4
    run_sft(part, *cfg, "--init_from=resume")
    assert losses(part)[0] == losses(full)[0]    # the same losses, bit for bit
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        assert torch.equal(GPT.from_pretrained(full)(ids), GPT.from_pretrained(part)(ids))


def test_nan_stops_without_overwriting(tmp_path, monkeypatch):
    out = str(tmp_path / "nan")
    real = train_sft.sft_loss
    calls = {"n": 0}

    def poisoned(model, batch, normalizer=None):
        calls["n"] += 1
        loss = real(model, batch, normalizer)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(train_sft, "sft_loss", poisoned)
    with pytest.raises(SystemExit, match="loss is nan at step 4"):
        run_sft(out, "--max_iters=10", "--eval_interval=0", "--save_interval=2")
    m = GPT.from_pretrained(out)
    assert m.meta["step"] == 4
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_embedding_only_moves_only_the_backtrack_rows(tmp_path):
    base = str(tmp_path / "base")
    run_sft(base, "--max_iters=2", "--eval_interval=0")
    out = str(tmp_path / "emb")
    run_sft(out, f"--init_from={base}", "--embedding_only=True", "--max_iters=5", "--eval_interval=0", "--lr=1e-2")
    only_bk_rows_moved(GPT.from_pretrained(base), GPT.from_pretrained(out))


def test_ddp_two_processes_match_one(tmp_path):
    common = TINY + ["--max_iters=4", "--eval_interval=0", "--save_interval=4"]
    one = str(tmp_path / "one")
    two = str(tmp_path / "two")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "train_sft.py", f"--out_dir={one}", "--batch_size=8", *common],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train_sft.py", f"--out_dir={two}", "--batch_size=4", *common],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    l1, _ = losses(one)
    l2, rows = losses(two)
    assert l1.keys() == l2.keys()
    for k in l1:
        assert abs(l1[k] - l2[k]) < 1e-5, (k, l1[k], l2[k])
    hashes = [r["rank_weight_hashes"] for r in rows if "rank_weight_hashes" in r][0]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        d = (GPT.from_pretrained(one)(ids) - GPT.from_pretrained(two)(ids)).abs().max().item()
    assert d < 1e-4


def test_generate_cli_uses_checkpoint(tmp_path):
    out = str(tmp_path / "g")
    run_sft(out, "--max_iters=2", "--eval_interval=2")
    r = subprocess.run([sys.executable, "generate.py", f"--ckpt={out}", "--prompt=3+4", "--max_new_tokens=12",
                        "--num_samples=2", "--temperature=1.0"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("resolved:") == 2
    r = subprocess.run([sys.executable, "generate.py", f"--ckpt={tmp_path / 'missing'}", "--prompt=1"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "no checkpoint" in r.stderr


def test_sft_from_a_hugging_face_gpt2_folder(tmp_path):
    """A GPT-2 folder as Hugging Face writes it (50257 rows, no backtrack token) trains with the
    gpt2 tokenizer: BK takes id 50257 in the padded table and is initialised, not left at zero."""
    torch.manual_seed(0)
    hf = str(tmp_path / "hf_gpt2")
    GPT(GPTConfig(vocab_size=50257, n_vocab=50257, block_size=512, n_layer=1, n_head=2, n_embd=32,
                  eot_id=50256, bk_id=50256)).export_hf(hf)
    cfg = json.load(open(os.path.join(hf, "config.json")))
    cfg.pop("backtrack_token_id")
    json.dump(cfg, open(os.path.join(hf, "config.json"), "w"))
    out = str(tmp_path / "sft")
    train_sft.main([f"--init_from={hf}", "--tokenizer=gpt2", "--task=gsm8k", "--block_size=512", "--batch_size=2",
                    "--max_iters=2", "--eval_interval=0", f"--out_dir={out}", "--progress=False", "--n_train=20"])
    m = GPT.from_pretrained(out)
    assert (m.config.vocab_size, m.config.bk_id, m.config.eot_id, m.config.tokenizer) == (50304, 50257, 50256, "gpt2")
    assert m.transformer.wte.weight[50257].abs().sum() > 0


def test_bad_traces_file_names_file_and_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"prompt": [1], "response": [2]}\n{"prompt": [1]\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:2: malformed"):
        read_traces(str(p), 258)
    p.write_text('{"prompt": [1], "response": [2]}\n\n{"prompt": [1]}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:3: not a trace line"):
        read_traces(str(p), 258)
    p.write_text('{"prompt": [1], "response": [2, 3]}\n')
    assert read_traces(str(p), 258)[0].response == [2, 3]


def test_equal_tokens_give_backtrack_traces_fewer_steps():
    """--max_tokens: backtrack traces are longer than clean ones, so a clean run gets more steps."""
    from common import configure
    from tasks import get_task
    from tokenizer import get_tokenizer
    tok, task = get_tokenizer("byte"), get_task("arith")
    pool = task.problems("train", n=2000)

    def tps(*args):
        cfg = train_sft.Config()
        configure(cfg, list(args))
        return train_sft.tokens_per_step(cfg, tok, task, pool)
    assert tps("--backtrack_ratio=0.0") < tps("--policy=keep")


def test_every_step_draws_from_the_traces_file(tmp_path):
    """--traces_ratio=1: every batch of the run, not only the first ones built ahead, holds the
    file's traces. One trace of a length no task trace has, so the tokens each step counts tell."""
    from data import Rule, Trace, layout
    trace = dict(prompt=[49, 43, 50, 10], response=[51] * 40 + [257, 52, 256])
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(trace) + "\n")
    per_trace = len(layout(Trace(trace["prompt"], trace["response"]), 257, Rule("keep"))["ids"])
    out = str(tmp_path / "run")
    run_sft(out, "--max_iters=8", "--batch_size=4", "--policy=keep", f"--traces_file={path}", "--traces_ratio=1.0",
            "--eval_interval=0")
    tokens = [json.loads(line)["tokens"] for line in open(os.path.join(out, "metrics.jsonl")) if '"tokens"' in line]
    assert tokens == [4 * per_trace] * 8   # each step's fed tokens


def test_a_string_flag_keeps_its_text():
    """--key=value for a string field is the text as written: a comma list is not a Python tuple
    ('0.35,0.5' once became '(0.35, 0.5)'), a number stays its digits, a quoted string loses its quotes."""
    import ablate
    from common import configure
    cfg = ablate.Config()
    configure(cfg, ["--triggers=0.35,0.5,0.65", "--task_kwargs=1", "--variants='clean'", "--seeds=2"])
    assert (cfg.triggers, cfg.task_kwargs, cfg.variants, cfg.seeds) == ("0.35,0.5,0.65", "1", "clean", 2)
