import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURES = os.path.join(ROOT, "tests", "fixtures")   # tiny Hugging Face checkpoints (make_fixtures.py)


def only_bk_rows_moved(m0, m1):
    """Embedding-only training: every parameter of m1 equals m0's bit for bit, except the backtrack
    token's rows of the embedding tables, which moved."""
    import torch
    bk = m0.config.bk_id
    for (n, p0), p1 in zip(m0.state_dict().items(), m1.state_dict().values()):
        if n in ("transformer.wte.weight", "lm_head.weight"):
            rows = torch.ones(p0.shape[0], dtype=torch.bool)
            rows[bk] = False
            assert torch.equal(p0[rows], p1[rows]), n
            assert not torch.equal(p0[bk], p1[bk]), n
        else:
            assert torch.equal(p0, p1), n
