"""ablate.py runs end to end at toy size and writes the table and the picture."""
import json
import os
import xml.dom.minidom

import ablate


def test_ablation_smoke(tmp_path):
    out = str(tmp_path / "abl")
    sft = "--n_layer=1 --n_head=2 --n_embd=32 --n_train=200 --max_new_tokens=8 --batch_size=8 --warmup_iters=1"
    grpo = "--prompts_per_step=2 --group_size=2 --max_new_tokens=8 --eval_at_start=False"
    ablate.main([f"--out_dir={out}", "--variants=clean,rewind,rewind+grpo", "--seeds=2", "--tokens=1500",
                 "--eval_n=2", "--eval_points=2", "--grpo_iters=1", f"--sft_args={sft}", f"--grpo_args={grpo}"])
    res = json.load(open(os.path.join(out, "results.json")))
    assert set(res) == {f"{v}/seed{s}" for v in ("clean", "rewind", "rewind+grpo") for s in (0, 1)}
    # equal tokens: backtrack traces are longer, so they get fewer steps
    assert ablate.tokens_per_step(["--backtrack_ratio=0.0"]) < ablate.tokens_per_step(["--policy=keep"])
    assert res["clean/seed0"]["iters"] >= res["rewind/seed0"]["iters"]
    table = open(os.path.join(out, "table.md")).read()
    assert table.count("\n") == 5 and "| rewind+grpo | 2 |" in table
    xml.dom.minidom.parse(os.path.join(out, "curves.svg"))  # well-formed
