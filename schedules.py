"""
Every schedule of a run in one room: what changes with training progress (the fraction of steps
done, 0..1). The backtrack curriculum of SFT (how many BKs a training trace may hold, research notes
7.2), GRPO's reward weights (7.3) and backtrack budget (7.4), and the learning rate. Each phased
schedule is a config string of phases 'start:value,...' read through phase_at.
"""
import math
from dataclasses import dataclass, field

from reward import COMPONENTS


def phase_at(phases, progress):
    """The value of the phase in force at progress: phases are (start, value), sorted, the first at 0;
    a phase holds until the next one starts. Every schedule here (backtrack caps, reward weights,
    backtrack budgets) reads its phases through this."""
    value = phases[0][1]
    for start, v in phases:
        if progress >= start:
            value = v
    return value


@dataclass
class Curriculum:
    """Phases (start fraction of training, max backtracks per trace), e.g. '0:2,0.3:5,0.6:10':
    at most 2 BKs for the first 30% of training, 5 until 60%, then 10. A cap of 'none' means no cap."""
    phases: list = field(default_factory=lambda: [(0.0, 2), (0.3, 5), (0.6, 10)])

    def __post_init__(self):
        self.phases = sorted((float(s), m) for s, m in self.phases)
        if not self.phases or self.phases[0][0] != 0.0:
            raise ValueError(f"curriculum {self.phases}: the first phase must start at 0")
        if not all(0 <= s <= 1 for s, _ in self.phases):
            raise ValueError(f"curriculum {self.phases}: phase starts are fractions of training, in [0, 1]")
        if not all(m is None or m >= 0 for _, m in self.phases):
            raise ValueError(f"curriculum {self.phases}: caps are >= 0, or none")

    @classmethod
    def from_string(cls, s):
        phases = []
        for part in s.split(","):
            start, _, cap = part.partition(":")
            if not cap:
                raise ValueError(f"bad curriculum phase {part!r}: expected 'start:max_backtracks'")
            cap = cap.strip().lower()
            phases.append((float(start), None if cap in ("none", "inf") else int(cap)))
        return cls(phases)

    def max_backtracks(self, progress):
        """The cap in force at progress (0..1, fraction of training done)."""
        return phase_at(self.phases, progress)

    def __str__(self):
        return ",".join(f"{s:g}:{'none' if m is None else m}" for s, m in self.phases)


# research notes 7.3: early training stresses the mechanism (process, backtracking), late training
# the answer. The format weight is not in the notes' table; it stays constant.
WEIGHT_PRESETS = {
    "notes": "0:outcome=0.5,process=0.8,backtrack=0.8,format=0.3;"
             "0.33:outcome=0.7,process=0.7,backtrack=0.6,format=0.3;"
             "0.67:outcome=1.0,process=0.5,backtrack=0.4,format=0.3",
    "constant": "0:outcome=1.0,process=0.7,backtrack=0.6,format=0.3",
}


@dataclass
class WeightSchedule:
    """Reward weights by training progress: phases (start fraction, {component: weight}).
    From a string 'start:k=v,k=v;start:k=v,...' (a phase holds until the next one starts; a
    component a phase leaves out weighs 0), a bare 'k=v,...' (one phase), or a preset name."""
    phases: list = field(default_factory=list)

    @classmethod
    def from_string(cls, s):
        s = WEIGHT_PRESETS.get(s.strip(), s)
        phases = []
        for part in filter(None, (p.strip() for p in s.split(";"))):
            start, sep, body = part.partition(":")
            if not sep:
                start, body = "0", part
            w = {}
            for kv in filter(None, (x.strip() for x in body.split(","))):
                k, eq, v = kv.partition("=")
                if not eq or k.strip() not in COMPONENTS:
                    raise ValueError(f"bad reward weight {kv!r} in {s!r}: expected name=value, names {COMPONENTS}")
                w[k.strip()] = float(v)
            phases.append((float(start), w))
        phases.sort(key=lambda x: x[0])
        if not phases or phases[0][0] != 0.0:
            raise ValueError(f"reward weights {s!r}: the first phase must start at 0")
        return cls(phases)

    def at(self, progress):
        w = phase_at(self.phases, progress)
        return {k: w.get(k, 0.0) for k in COMPONENTS}


def budget_at(schedule, progress, max_budget=8.0, min_budget=1.0, decay=0.25):
    """The backtrack budget in force at progress (0..1) (research notes 7.4: it starts generous and
    tightens). schedule 'exp': max(min_budget, max_budget * decay ** progress), a float (a
    completion is over budget when n_bk > budget); 'none': no budget; otherwise phases
    'start:budget,...' as in Curriculum (e.g. '0:8,0.5:4,0.8:2'; 'none' = uncapped)."""
    schedule = schedule.strip()
    if schedule == "none":
        return None
    if schedule == "exp":
        return max(min_budget, max_budget * decay ** progress)
    return Curriculum.from_string(schedule).max_backtracks(progress)


def lr_at(it, cfg):
    """Linear warmup, then cosine decay to min_lr at max_iters."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    r = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * r)) * (cfg.lr - cfg.min_lr)
