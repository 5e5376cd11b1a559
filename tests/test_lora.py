"""LoRA: an adapted model starts as its base, bit for bit; a step moves only the adapters (and the
BK rows when asked); merged weights compute what the adapters do, in this code, in cached decoding
and in transformers after export; resume is exact; GRPO's reference is the starting model without
a copy of its weights; DDP and FSDP2 train adapters as one process does."""
import json
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import train_grpo
import train_sft
from conftest import ROOT
from data import Rule
from decode import generate
from model import GPT, add_lora, lora_modules, merge_lora, merged_state_dict
from test_hf_families import fixture, reference
from test_train_sft import TINY, losses

LORA = ["--lora_rank=4", "--lora_alpha=8"]


def randomized(model, seed=0):
    """Adapters with random B (a trained adapter's shape of values), so that merging has work to do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, lora in lora_modules(model):
            lora.B.copy_(torch.randn(lora.B.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora") / "base")
    train_sft.main(TINY + [f"--out_dir={out}", "--max_iters=3", "--eval_interval=0"])
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen3"])
def test_adapters_start_at_the_base_model(name):
    m = GPT.from_pretrained(fixture(name))
    ids, _ = reference(name)
    with torch.no_grad():
        before = m(ids)
        add_lora(m, 8, 16.0, "attn,mlp")
        assert len(lora_modules(m)) == m.config.n_layer * (5 if m.config.mlp == "swiglu" else 4)
        assert torch.equal(m(ids), before)


def test_a_lora_step_moves_only_the_adapters_and_the_bk_rows(base, tmp_path):
    bk = GPT.from_pretrained(base).config.bk_id
    for lora_bk in (True, False):
        out = str(tmp_path / f"bk{lora_bk}")
        train_sft.main(TINY + [f"--out_dir={out}", f"--init_from={base}", *LORA, f"--lora_bk={lora_bk}",
                               "--max_iters=3", "--eval_interval=0", "--lr=1e-2", "--weight_decay=0.1"])
        m0, m1 = GPT.from_pretrained(base).state_dict(), GPT.from_pretrained(out).state_dict()
        adapters = [k for k in m1 if ".lora." in k]
        assert adapters and set(m1) - set(m0) == set(adapters)
        assert all(m1[k].abs().sum() > 0 for k in adapters if k.endswith(".B"))   # B left zero: they trained
        for k, p0 in m0.items():
            if k in ("transformer.wte.weight", "lm_head.weight") and lora_bk:   # tied: one table
                rows = torch.ones(p0.shape[0], dtype=torch.bool)
                rows[bk] = False
                assert torch.equal(m1[k][rows], p0[rows]) and not torch.equal(m1[k][bk], p0[bk])
            else:
                assert torch.equal(m1[k], p0), k
        state = torch.load(os.path.join(out, "train_state.pt"), weights_only=False)["optimizer"]["state"]
        assert len(state) == len(adapters) + lora_bk   # no optimizer state for a frozen tensor


def test_merged_weights_compute_what_the_adapters_do(base):
    m = randomized(add_lora(GPT.from_pretrained(base), 4, 8.0, "attn,mlp"))
    plain = GPT.from_pretrained(base)
    plain.load_state_dict(merged_state_dict(m))
    ids = torch.randint(0, 256, (3, 20))
    with torch.no_grad():
        assert (m(ids) - plain(ids)).abs().max().item() < 1e-5
    # cached decoding, one row and several (the packed-weight path), takes the adapters along
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    for rows in (prompts[:1], prompts):
        kw = dict(max_new_tokens=12, rule=Rule("rewind"), temperature=0.0)
        assert [o["response"] for o in generate(m, rows, **kw)] == [o["response"] for o in generate(plain, rows, **kw)]
    merged = merge_lora(m)
    assert not lora_modules(merged) and merged.config.lora_rank == 0
    with torch.no_grad():
        assert (merged(ids) - plain(ids)).abs().max().item() < 1e-5


def test_lora_resume_is_exact(base, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    cfg = TINY + [f"--init_from={base}", *LORA, "--max_iters=6", "--eval_interval=0", "--save_interval=100"]
    train_sft.main(cfg + [f"--out_dir={full}"])
    train_sft.main(cfg + [f"--out_dir={part}", "--stop_at=3"])
    train_sft.main(TINY + [f"--out_dir={part}", "--init_from=resume"])
    assert losses(part)[0] == losses(full)[0]
    a, b = GPT.from_pretrained(full).state_dict(), GPT.from_pretrained(part).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_export_merges_and_opens_in_transformers(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    m = randomized(add_lora(GPT.from_pretrained(fixture(name)), 4, 8.0, "attn,mlp"), seed=1)
    m.export_hf(str(tmp_path))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids, _ = reference(name)
    with torch.no_grad():
        a, b = m(ids), theirs(ids).logits
    assert a.shape == b.shape and (a - b).abs().max().item() < 1e-5
    assert lora_modules(m)   # exporting leaves the model as it was
    assert not any("lora" in k for k in json.load(open(os.path.join(tmp_path, "config.json"))))


GRPO = ["--prompts_per_step=2", "--group_size=2", "--max_new_tokens=8", "--eval_n=2", "--eval_interval=0",
        "--eval_at_start=False", "--progress=False", "--micro_batch=4"]


def test_grpo_reference_is_the_starting_model(base, tmp_path):
    """With adapters GRPO keeps no second model: its KL reference is the frozen base with the adapters
    (and BK rows) of the starting checkpoint swapped in. At the first step policy and reference are
    the same network, so the KL is exactly 0; later it is not."""
    lora_sft = str(tmp_path / "lora_sft")
    train_sft.main(TINY + [f"--out_dir={lora_sft}", f"--init_from={base}", *LORA, "--max_iters=3",
                           "--eval_interval=0", "--lr=1e-2"])
    out = str(tmp_path / "grpo")
    with pytest.raises(SystemExit, match="--lora_rank=8: the starting checkpoint has rank-4"):
        train_grpo.main(GRPO + [f"--init_from={lora_sft}", f"--out_dir={out}", "--lora_rank=8"])
    assert not os.path.exists(out)
    train_grpo.main(GRPO + [f"--init_from={lora_sft}", f"--out_dir={out}", "--beta=0.1", "--max_iters=3", "--lr=1e-2"])
    kl = [r["kl"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "kl" in r]
    assert kl[0] == 0.0 and max(kl[1:]) > 0
    model, start = GPT.from_pretrained(out), GPT.from_pretrained(lora_sft)
    train_grpo.choose_trainable(model, train_grpo.Config(), model.config.bk_id)
    ref = train_grpo.Reference(model, lora_sft, model.config.bk_id)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        now = model(ids)
        with ref:
            assert torch.equal(model(ids), start(ids))
        assert torch.equal(model(ids), now) and not torch.equal(now, start(ids))


def torchrun(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train_sft.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)


def test_ddp_and_fsdp_train_adapters_as_one_process_does(base, tmp_path):
    common = TINY + [f"--init_from={base}", *LORA, "--lora_bk=False", "--max_iters=4", "--eval_interval=0"]
    one, ddp, fsdp = (str(tmp_path / n) for n in ("one", "ddp", "fsdp"))
    train_sft.main(common + [f"--out_dir={one}", "--batch_size=8"])
    for out, extra in ((ddp, []), (fsdp, ["--fsdp=True"])):
        r = torchrun(*common, f"--out_dir={out}", "--batch_size=4", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        a, b = losses(one)[0], losses(out)[0]
        assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-5, (out, a, b)
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        w = [GPT.from_pretrained(p) for p in (one, ddp, fsdp)]
        assert all(lora_modules(x) for x in w)
        assert max((w[0](ids) - x(ids)).abs().max().item() for x in w[1:]) < 1e-4
