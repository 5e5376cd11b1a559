"""The real command lines on bad input, interrupts and resume: one line saying what is wrong, a
non-zero exit, no traceback, nothing on disk overwritten; a resumed run equals an uninterrupted one."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from model import GPT
import train_sft

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=128", "--n_train=200", "--eval_n=4",
        "--max_new_tokens=8", "--log_interval=1", "--progress=False", "--warmup_iters=2", "--lr=3e-3"]


def run(*args, stdin=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL if stdin is None else stdin)


def folder_hash(path):
    """One hash of every file under path (names and bytes): 'nothing overwritten' means it is unchanged."""
    h = hashlib.sha256()
    for d, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            h.update(os.path.join(os.path.relpath(d, path), f).encode())
            with open(os.path.join(d, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def assert_one_line_error(p, *words):
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0, p.stdout
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr
    assert lines[0].startswith("error:"), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A finished tiny SFT run, with an eval.json, that every bad command below must leave untouched."""
    out = str(tmp_path_factory.mktemp("cli") / "sft")
    train_sft.main(TINY + [f"--out_dir={out}", "--max_iters=3", "--eval_interval=0"])
    with open(os.path.join(out, "eval.json"), "w") as f:
        f.write('{"good": true}')
    return out


@pytest.mark.parametrize("args, words", [
    (["--batch_size=0"], ["--batch_size=0"]),
    (["--batch_size=-4"], ["--batch_size=-4"]),
    (["--save_interval=0"], ["--save_interval=0"]),
    (["--max_iters=-3"], ["--max_iters=-3"]),
    (["--backtrack_ratio=1.5"], ["--backtrack_ratio"]),
    (["--policy=sideways"], ["--policy=sideways"]),
    (["--no_such_key=1"], ["no_such_key"]),
    (["--batch_size=lots"], ["batch_size"]),
    (["missing_config.json"], ["missing_config.json"]),
    (["--task=nope"], ["nope"]),
    (["--task=gsm8k", "--task_kwargs=path=/no/such/file.jsonl"], ["/no/such/file.jsonl"]),
    (["--tokenizer=/no/such/tokenizer"], ["/no/such/tokenizer"]),
    (["--traces_ratio=0.5"], ["--traces_file"]),
    (["--init_from=/no/such/checkpoint"], ["/no/such/checkpoint"]),
    (["--augment=dfs"], ["--augment=dfs", "arith"]),
    (["--task=sudoku", "--task_kwargs=min_blanks=30,max_blanks=20"], ["sudoku", "blanks"]),
    (["--lora_rank=-1"], ["--lora_rank=-1"]),
    (["--lora_rank=4", "--lora_targets=ffn"], ["--lora_targets=ffn"]),
    (["--lora_rank=4", "--lora_alpha=0"], ["--lora_alpha=0"]),
    (["--lora_rank=4", "--embedding_only=True"], ["--lora_rank", "--embedding_only"]),
    (["--lora_rank=4", "--fsdp=True"], ["--fsdp", "--lora_bk"]),
])
def test_train_sft_bad_arguments(ckpt, args, words):
    before = folder_hash(ckpt)
    p = run("train_sft.py", *TINY, f"--out_dir={ckpt}", "--init_from=resume", "--max_iters=5", *args)
    assert_one_line_error(p, *words)
    assert folder_hash(ckpt) == before


def test_a_new_run_never_overwrites_a_finished_one(ckpt):
    before = folder_hash(ckpt)
    p = run("train_sft.py", *TINY, f"--out_dir={ckpt}")
    assert_one_line_error(p, "--init_from=resume")
    assert folder_hash(ckpt) == before


def test_nothing_to_resume(tmp_path):
    p = run("train_sft.py", f"--out_dir={tmp_path}", "--init_from=resume")
    assert_one_line_error(p, "nothing to resume")


def test_traces_file_checks(ckpt, tmp_path):
    bad = tmp_path / "traces.jsonl"
    bad.write_text('{"prompt": [1], "response": [2]}\n{"prompt": [1], "response": [99999]}\n')
    before = folder_hash(ckpt)
    p = run("train_sft.py", *TINY, f"--out_dir={ckpt}", "--init_from=resume", "--max_iters=5",
            f"--traces_file={bad}", "--traces_ratio=0.5")
    assert_one_line_error(p, "traces.jsonl:2", "99999")
    p = run("train_sft.py", *TINY, f"--out_dir={ckpt}", "--init_from=resume", "--max_iters=5", f"--traces_file={bad}")
    assert_one_line_error(p, "--traces_ratio")
    assert folder_hash(ckpt) == before


def test_later_stages_bad_arguments(ckpt, tmp_path):
    out = str(tmp_path / "grpo")
    for args, word in ([["--max_iters=-3"], "--max_iters=-3"], [["--group_size=1"], "--group_size=1"],
                       [["--temperature=0"], "--temperature=0"], [["--top_p=0"], "--top_p=0"],
                       [[f"--init_from={tmp_path}"], str(tmp_path)], [["--budget=0:x"], "--budget=0:x"],
                       [["--dr_grpo_tokens=-1"], "--dr_grpo_tokens=-1"], [["--max_retries=2x"], "--max_retries=2x"]):
        p = run("train_grpo.py", f"--init_from={ckpt}", f"--out_dir={out}", *args)
        assert_one_line_error(p, word)
        assert not os.path.exists(os.path.join(out, "train_state.pt")), args   # refused before anything is written
    p = run("train_dpo.py", f"--init_from={ckpt}", f"--out_dir={tmp_path / 'dpo'}", f"--pairs_file={tmp_path / 'no.jsonl'}")
    assert_one_line_error(p, "no.jsonl")
    p = run("self_errors.py", f"--ckpt={tmp_path / 'none'}")
    assert_one_line_error(p, "none")
    assert_one_line_error(run("self_errors.py", f"--ckpt={ckpt}", "--samples=0"), "--samples=0")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": [1], "prefix": [], "chosen": [2], "rejected": [3]}\n'
                     '{"prompt": [1], "prefix": [], "chosen": [2], "rejected": [123456]}\n')
    p = run("train_dpo.py", f"--init_from={ckpt}", f"--out_dir={tmp_path / 'dpo2'}", f"--pairs_file={pairs}")
    assert_one_line_error(p, "pairs.jsonl:2", "123456")
    assert_one_line_error(run("ablate.py", f"--out_dir={tmp_path / 'abl'}", "--seeds=0"), "--seeds=0")
    bad_cfg = tmp_path / "bad_config.py"
    bad_cfg.write_text("max_iters = 10 +\n")
    assert_one_line_error(run("train_sft.py", str(bad_cfg), f"--out_dir={tmp_path / 'sft'}"), "bad_config.py")
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "abl") and not os.path.exists(tmp_path / "sft")


@pytest.mark.parametrize("args, words", [
    (["--prompt="], ["--prompt"]),
    (["--prompt", ""], ["--prompt"]),
    (["--prompt", "  "], ["--prompt"]),
    (["--prompt", "7+5", "--temperature=-1"], ["--temperature=-1"]),
    (["--prompt", "7+5", "--num_samples=0"], ["--num_samples=0"]),
    (["--prompt", "7+5", "--top_p=2"], ["--top_p=2"]),
    (["--prompt", "7+5" * 100], ["--prompt", "block"]),
])
def test_generate_bad_arguments(ckpt, args, words):
    assert_one_line_error(run("generate.py", f"--ckpt={ckpt}", *args), *words)


def test_generate_without_a_checkpoint(tmp_path):
    assert_one_line_error(run("generate.py", f"--ckpt={tmp_path}", "--prompt", "7+5"), str(tmp_path), "train_sft.py")


def test_generate_and_evaluate_into_a_closed_pipe(ckpt):
    for cmd in (f"generate.py --ckpt={ckpt} --prompt 7+5 --num_samples=8 --temperature=1",
                f"evaluate.py --ckpt={ckpt} --n=8 --out={ckpt}/pipe_eval.json"):
        p = subprocess.run(f"{sys.executable} {cmd} | head -c 10", shell=True, cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0 and "Traceback" not in p.stderr and "Error" not in p.stderr, p.stderr
    os.remove(os.path.join(ckpt, "pipe_eval.json"))


def test_evaluate_bad_arguments_keep_the_old_results(ckpt):
    before = folder_hash(ckpt)
    for args, word in ([["--n=0"], "--n=0"], [["--temperature=-0.5"], "--temperature=-0.5"],
                       [["--policy=sideways"], "--policy=sideways"], [["--pop_below=1.5"], "--pop_below=1.5"],
                       [["--oracle_search=True"], "--oracle_search"]):
        assert_one_line_error(run("evaluate.py", f"--ckpt={ckpt}", *args), word)
    assert folder_hash(ckpt) == before


def test_evaluate_without_slot_bans_samples_only(ckpt, tmp_path):
    """Under `rewind` without slot bans or a retry limit greedy decoding is undefined (docs §4):
    evaluate.py then reports the sampled pass alone, and refuses --temperature=0 in one line."""
    out = tmp_path / "nobans.json"
    p = run("evaluate.py", f"--ckpt={ckpt}", "--n=4", "--slot_bans=off", f"--out={out}")
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert "greedy" not in res and "T=1.0" in res and res["slot_bans"] is False
    assert_one_line_error(run("evaluate.py", f"--ckpt={ckpt}", "--n=4", "--slot_bans=off", "--temperature=0",
                              f"--out={out}"), "--temperature=0")
    # the training stages' periodic evaluation does the same (train_grpo.py --slot_bans=off)
    from checkpoint import load_model
    from data import Rule
    from heldout import held_out_eval
    from tasks import get_task
    model, tok = load_model(ckpt)
    task = get_task("arith")
    rule = Rule("rewind", slot_bans=False)
    res = held_out_eval(model, tok, task, task.problems("test", n=2), rule, 1.0, 8, seed=0)
    assert "eval/t1/acc" in res and not any(k.startswith("eval/greedy") for k in res)
    assert "eval/greedy/acc" in held_out_eval(model, tok, task, task.problems("test", n=2), Rule("rewind", False, 1),
                                              1.0, 8, seed=0)


# -----------------------------------------------------------------------------
# resume and interrupts


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def test_resume_alone_equals_an_uninterrupted_run(tmp_path):
    """--init_from=resume with nothing else restores every flag of the run (here several non-defaults),
    logs each step once and ends with the same weights."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    flags = TINY + ["--max_iters=8", "--eval_interval=4", "--save_interval=3", "--lr=2e-3", "--seed=7",
                    "--backtrack_ratio=0.8", "--policy=keep"]
    train_sft.main(flags + [f"--out_dir={full}"])
    train_sft.main(flags + [f"--out_dir={part}", "--stop_at=5"])
    train_sft.main([f"--out_dir={part}", "--init_from=resume"])
    drop = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rows]
    assert drop(metrics(part)) == drop(metrics(full))     # the same rows, none twice
    cf, cp = GPT.from_pretrained(full).meta, GPT.from_pretrained(part).meta
    for k in ("init_from", "stop_at", "out_dir"):
        cf["train_config"].pop(k), cp["train_config"].pop(k)
    assert cp["train_config"] == cf["train_config"]
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        assert torch.equal(GPT.from_pretrained(full)(ids), GPT.from_pretrained(part)(ids))


def wait_for(cond, timeout=120):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def test_kill_before_the_first_periodic_save_leaves_a_resumable_run(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    flags = TINY + ["--max_iters=6", "--eval_interval=0", "--save_interval=1000"]
    train_sft.main(flags + [f"--out_dir={full}"])
    p = subprocess.Popen([sys.executable, "train_sft.py", *flags, f"--out_dir={part}"], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.exists(os.path.join(part, "train_state.pt")) or p.poll() is not None)
    p.kill()
    p.wait()
    train_sft.main([f"--out_dir={part}", "--init_from=resume"])
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        assert torch.equal(GPT.from_pretrained(full)(ids), GPT.from_pretrained(part)(ids))


def test_sigint_saves_at_the_end_of_the_step(tmp_path):
    out = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, "train_sft.py", *TINY, f"--out_dir={out}", "--max_iters=100000",
                          "--eval_interval=0", "--save_interval=100000"], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = os.path.join(out, "metrics.jsonl")
    wait_for(lambda: os.path.exists(log) and sum(1 for _ in open(log)) >= 3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGINT and "Traceback" not in err, err
    step = GPT.from_pretrained(out).meta["step"]
    assert step >= 3 and metrics(out)[-1]["step"] == step - 1   # saved after the last logged step
    train_sft.main([f"--out_dir={out}", "--init_from=resume", f"--max_iters={step + 2}"])
    assert GPT.from_pretrained(out).meta["step"] == step + 2
