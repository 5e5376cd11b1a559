"""FSDP2 (torch's fully_shard) on two CPU processes under gloo matches DDP: the same losses, the same
weights, and a sharded run resumes exactly."""
import json
import os
import subprocess
import sys

import torch

from conftest import ROOT
from model import GPT

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=128", "--n_train=200", "--eval_n=4",
        "--max_new_tokens=8", "--log_interval=1", "--progress=False", "--warmup_iters=2", "--lr=3e-3",
        "--batch_size=4", "--grad_accum=2", "--eval_interval=3", "--max_iters=6"]


def torchrun(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train_sft.py", *TINY, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def test_fsdp_matches_ddp_and_resumes(tmp_path):
    ddp, fsdp, part = str(tmp_path / "ddp"), str(tmp_path / "fsdp"), str(tmp_path / "part")
    torchrun(f"--out_dir={ddp}")
    torchrun(f"--out_dir={fsdp}", "--fsdp=True")
    loss = lambda out: {r["step"]: r["loss"] for r in rows(out) if "loss" in r}
    a, b = loss(ddp), loss(fsdp)
    assert a.keys() == b.keys() and len(a) == 6
    assert max(abs(a[k] - b[k]) for k in a) < 1e-5, (a, b)
    acc = lambda out: [r["eval/greedy/acc"] for r in rows(out) if "eval/greedy/acc" in r]
    assert len(acc(fsdp)) == 2 and acc(fsdp) == acc(ddp)   # evaluation runs on the sharded model too
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        w_ddp, w_fsdp = GPT.from_pretrained(ddp), GPT.from_pretrained(fsdp)
        assert (w_ddp(ids) - w_fsdp(ids)).abs().max().item() < 1e-4
    # a sharded run stopped after step 4 and resumed from its gathered checkpoint ends where the whole run did
    torchrun(f"--out_dir={part}", "--fsdp=True", "--stop_at=4")
    torchrun(f"--out_dir={part}", "--init_from=resume")
    assert loss(part) == b
    with torch.no_grad():
        assert torch.equal(GPT.from_pretrained(part)(ids), w_fsdp(ids))
