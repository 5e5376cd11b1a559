"""ablate.py runs end to end at toy size and writes the table and the picture."""
import json
import os
import xml.dom.minidom

import pytest

import ablate


def test_ablation_smoke(tmp_path):
    out = str(tmp_path / "abl")
    sft = "--n_layer=1 --n_head=2 --n_embd=32 --n_train=200 --max_new_tokens=8 --batch_size=8 --warmup_iters=1"
    grpo = "--prompts_per_step=2 --group_size=2 --max_new_tokens=8 --eval_at_start=False"
    ablate.main([f"--out_dir={out}", "--variants=clean,rewind,rewind+grpo", "--seeds=2", "--tokens=1500",
                 "--eval_n=2", "--eval_points=2", "--grpo_iters=1", f"--sft_args={sft}", f"--grpo_args={grpo}",
                 "--vote_k=2", "--long_kwargs=steps=5", "--max_new_tokens=8"])
    res = json.load(open(os.path.join(out, "results.json")))
    assert set(res) == {f"{v}/seed{s}" for v in ("clean", "rewind", "rewind+grpo") for s in (0, 1)}
    # equal tokens: backtrack traces are longer, so they get fewer steps
    assert res["clean/seed0"]["iters"] >= res["rewind/seed0"]["iters"]
    table = open(os.path.join(out, "table.md")).read()
    assert table.count("\n") == 7 and "| rewind+grpo | 2 |" in table
    assert "| clean, majority of 2 at T=1 | 2 |" in table and "pass@2" in table and "(long)" in table
    r = res["clean/seed0"]   # every split evaluated by evaluate.py, the clean model's vote too
    assert {"test/greedy/acc", "long/t1/acc", "test/vote/majority_acc", "long/vote/pass_at_k"} <= set(r)
    xml.dom.minidom.parse(os.path.join(out, "curves.svg"))  # well-formed


def test_self_and_dpo_stages(tmp_path, monkeypatch):
    """The +self and +dpo stages run on the base model's own-error files (hand-built here: an
    untrained model makes no usable errors) and land in the table."""
    import random
    from augment import build_traces
    from tasks import get_task
    from tokenizer import Tokenizer
    tok, task = Tokenizer("byte"), get_task("arith")
    probs = task.problems("train", n=8)
    traces = build_traces(tok, task, probs, random.Random(0), backtrack_ratio=1.0, max_backtracks=2)
    files = {}

    def fake_own_errors(cfg, run, seed):
        t, p = os.path.join(run, "self_traces.jsonl"), os.path.join(run, "self_pairs.jsonl")
        with open(t, "w") as f:
            for tr in traces:
                f.write(json.dumps(dict(prompt=tr.prompt, response=tr.response)) + "\n")
        with open(p, "w") as f:
            for pr in probs:
                sol = tok.encode(pr["solution"])
                wrong = tok.encode("7" if pr["solution"][1] != "7" else "8")   # a slip at the second token
                f.write(json.dumps(dict(prompt=tok.encode(task.prompt(pr)), prefix=sol[:1] + wrong,
                                        chosen=[tok.bk_id] + sol[1:] + [tok.eot_id], rejected=sol[2:] + [tok.eot_id])) + "\n")
        files[run] = (t, p)
        return t, p

    monkeypatch.setattr(ablate, "own_errors", fake_own_errors)
    out = str(tmp_path / "abl")
    sft = "--n_layer=1 --n_head=2 --n_embd=32 --n_train=200 --max_new_tokens=8 --batch_size=8 --warmup_iters=1"
    ablate.main([f"--out_dir={out}", "--variants=rewind,rewind+self,rewind+dpo", "--seeds=1", "--tokens=500",
                 "--eval_n=2", "--eval_points=1", "--stage_iters=1", f"--sft_args={sft}"])
    res = json.load(open(os.path.join(out, "results.json")))
    assert set(res) == {"rewind/seed0", "rewind+self/seed0", "rewind+dpo/seed0"}
    assert len(files) == 1                        # one set of own-error files per base run, shared
    assert "| rewind+dpo | 1 |" in open(os.path.join(out, "table.md")).read()


def test_sudoku_search_rows(tmp_path):
    """The sudoku variants: depth-first search traces, two runs at a time (--jobs), and the clean
    model as proposer in a rule-checked search, with tokens and FLOPs per problem beside each row."""
    out = str(tmp_path / "abl")
    sft = "--n_layer=1 --n_head=2 --n_embd=32 --n_train=100 --max_new_tokens=60 --batch_size=4 --warmup_iters=1 --block_size=256"
    ablate.main([f"--out_dir={out}", "--task=sudoku", "--variants=clean,dfs_rewind,dfs_keep", "--seeds=1", "--tokens=6000",
                 "--eval_n=2", "--eval_points=1", f"--sft_args={sft}", "--vote_k=2", "--oracle=True", "--jobs=2",
                 "--long_kwargs=min_blanks=20,max_blanks=22", "--max_new_tokens=60"])
    res = json.load(open(os.path.join(out, "results.json")))
    assert set(res) == {f"{v}/seed0" for v in ("clean", "dfs_rewind", "dfs_keep")}
    assert res["clean/seed0"]["iters"] > res["dfs_rewind/seed0"]["iters"]   # search traces are longer
    r = res["clean/seed0"]
    # a complete search: whatever it finishes within the token cap is solved
    assert r["test/oracle/acc"] == 1.0 and r["long/oracle/flops_per_problem"] > 0
    assert r["long/oracle/acc"] == r["long/oracle/finished"]
    table = open(os.path.join(out, "table.md")).read()
    assert "| clean proposes, rule checker verifies (DFS) | 1 |" in table and "GFLOPs/problem" in table
    assert "| dfs_keep | 1 |" in table


def test_verifier_head_rows(tmp_path, monkeypatch):
    """rewind_head and its stages: head-triggered rows for every model with a head (--triggers), GRPO
    with the base's head as PRM (+grpo_prm) and with the +located model's (+located_prm), and the
    location table (the located traces are hand-built: an untrained model makes no usable errors)."""
    import random
    from augment import build_traces
    from tasks import get_task
    from tokenizer import Tokenizer
    tok, task = Tokenizer("byte"), get_task("arith")
    traces = build_traces(tok, task, task.problems("train", n=8), random.Random(0), backtrack_ratio=1.0, max_backtracks=2)
    calls = []

    def fake_located(cfg, run, seed):
        t = os.path.join(run, "located_traces.jsonl")
        with open(t, "w") as f:
            for tr in traces:
                f.write(json.dumps(dict(prompt=tr.prompt, response=tr.response)) + "\n")
        calls.append(run)
        return t, dict(searched=10, located=8, checker_agree=0.75, tokens_per_located=120.0, traces=8, note="text")

    monkeypatch.setattr(ablate, "located_errors", fake_located)
    out = str(tmp_path / "abl")
    sft = "--n_layer=1 --n_head=2 --n_embd=32 --n_train=200 --max_new_tokens=8 --batch_size=8 --warmup_iters=1"
    grpo = "--prompts_per_step=2 --group_size=2 --max_new_tokens=8 --eval_at_start=False"
    ablate.main([f"--out_dir={out}", "--variants=rewind_head,rewind_head+grpo_prm,rewind_head+located,rewind_head+located_prm",
                 "--seeds=1", "--tokens=500", "--eval_n=2", "--eval_points=1", "--stage_iters=1", "--grpo_iters=1",
                 f"--sft_args={sft}", f"--grpo_args={grpo}", "--triggers=0.5", "--vote_k=0"])
    res = json.load(open(os.path.join(out, "results.json")))
    assert set(res) == {f"{v}/seed0" for v in ("rewind_head", "rewind_head+grpo_prm", "rewind_head+located",
                                                "rewind_head+located_prm")}
    assert "trigger0.5:test/greedy/acc" in res["rewind_head/seed0"] and "test/greedy/precision" in res["rewind_head/seed0"]
    assert res["rewind_head+located/seed0"]["locate/checker_agree"] == 0.75
    grpo_cfg = json.load(open(os.path.join(out, "rewind_head", "seed0-located_prm", "config.json")))["train_config"]
    assert grpo_cfg["prm"].endswith("seed0-located")   # the +located model's head scores the process
    table = open(os.path.join(out, "table.md")).read()
    assert "| rewind_head, head trigger 0.5 | 1 |" in table and "| rewind_head+located_prm, head trigger 0.5 | 1 |" in table
    located_rows = table.split("agrees with the checker")[1]
    assert "| rewind_head | 1 |" in located_rows and "0.750" in located_rows   # the search's stats, per base
    with pytest.raises(SystemExit):
        ablate.main([f"--out_dir={out}", "--variants=rewind_head", "--triggers=0.5,0"])
