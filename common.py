"""
The floor every file stands on, importing no module of this project: one config system (a dataclass
with --key=value overrides), reading JSON files, processes (DDP under torchrun) and their reductions,
the JSONL metrics log, the stop signals, and one clean way to fail on bad input.

The rest of the house, from the bottom up (README.md's file map; tests/test_layering.py holds it):
tokenizer, hf (formats), tasks/, data (the semantics, rule and layouts), augment, model, decode,
reward, schedules, checkpoint, heldout, training; then the stage scripts (train_sft.py,
train_grpo.py, ...), which import those and never each other.
"""
import ast
import gzip
import json
import os
import signal
import sys
from dataclasses import fields

import torch

# -----------------------------------------------------------------------------
# config


def configure(cfg, argv):
    """Apply optional config files (.json or .py) and --key=value overrides to a dataclass, in order.
    "--key value" works too, and a bare "--flag" sets a boolean to True. Values are parsed as Python
    literals where they parse, else kept as strings. Returns the keys set on the command line."""
    types = {f.name: f.type for f in fields(cfg)}
    given = []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise SystemExit(f"error: config file {arg!r} not found (arguments look like --key=value)")
            if arg.endswith(".json"):
                items = read_json(arg).items()
            else:
                scope = {}
                try:
                    exec(open(arg).read(), {}, scope)
                except Exception as e:
                    raise SystemExit(f"error: config file {arg}: {type(e).__name__}: {e}")
                items = [(k, v) for k, v in scope.items() if not k.startswith("_")]
            for k, v in items:
                _set(cfg, types, k, v, arg)
                given.append(k)
            continue
        if "=" in arg:
            k, v = arg[2:].split("=", 1)
        else:
            k = arg[2:]
            if isinstance(getattr(cfg, k, None), bool) and (i == len(argv) or argv[i].startswith("--")):
                v = "True"
            elif i < len(argv):
                v, i = argv[i], i + 1
            else:
                raise SystemExit(f"error: {arg} needs a value: {arg}=VALUE")
        try:
            lit = ast.literal_eval(v)
            # a string field keeps its text ('0.35,0.5' is no tuple), unless the text is a quoted string
            v = lit if not isinstance(getattr(cfg, k, None), str) or isinstance(lit, str) else v
        except (ValueError, SyntaxError):
            pass
        _set(cfg, types, k, v, arg)
        given.append(k)
    return given


def _set(cfg, types, k, v, where):
    if k not in types:
        raise SystemExit(f"error: unknown config key {k!r} (from {where}); known: {', '.join(types)}")
    t = type(getattr(cfg, k))
    if t is bool and not isinstance(v, bool):
        raise SystemExit(f"error: {where}: {k} takes True or False, got {v!r}")
    if t is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if t is tuple and isinstance(v, list):
        v = tuple(v)
    if t is str and not isinstance(v, str):
        v = str(v)
    if not isinstance(v, t):
        raise SystemExit(f"error: {where}: {k} takes a {t.__name__}, got {v!r}")
    setattr(cfg, k, v)


def parse_kwargs(s):
    """'steps=3,digits=1' -> {'steps': 3, 'digits': 1}."""
    out = {}
    for part in filter(None, s.split(",")):
        k, _, v = part.partition("=")
        try:
            out[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            out[k.strip()] = v.strip()
    return out


def require(cfg, keys, ok, what):
    """Reject a setting that cannot work, before any work is done: one line naming the argument.
    keys: the config fields the rule applies to (a stage passes the ones it has)."""
    for k in keys.split() if isinstance(keys, str) else keys:
        if not ok(getattr(cfg, k)):
            raise SystemExit(f"error: --{k}={getattr(cfg, k)}: {what}")


def step_seed(seed, step):
    """The seed of one step's randomness (a batch, a shuffle, a rollout), distinct for every (seed,
    step) pair that a run meets: a resumed run draws the same numbers at the same step."""
    return seed * 1_000_003 + step

# -----------------------------------------------------------------------------
# files


def read_json(path):
    """A JSON file; a syntax error names the file and the line."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def read_jsonl(path, fields=()):
    """(line number, row) for each row of a JSONL file (.jsonl, or .jsonl.gz). A malformed line, or a
    row missing a string field, raises ValueError naming the file and the line, so a bad data file
    fails loudly instead of training on less."""
    rows = []
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object")
            for k in fields:
                if not isinstance(row.get(k), str):
                    raise ValueError(f"{path}:{i}: missing or non-string field {k!r}")
            rows.append((i, row))
    return rows

# -----------------------------------------------------------------------------
# processes


def setup_ddp(device):
    """Returns (ddp, rank, world_size, device). Under torchrun: gloo on CPU, nccl on CUDA."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if not ddp:
        return False, 0, 1, device
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return True, rank, world, device


def all_reduce_sum(x, ddp):
    """Sum x over processes, in place (returns it). nccl reduces only CUDA tensors, so a CPU tensor
    makes the trip through the GPU."""
    if ddp:
        import torch.distributed as dist
        if dist.get_backend() == "nccl" and not x.is_cuda:
            x.copy_(all_reduce_sum(x.cuda(), ddp).cpu())
        else:
            dist.all_reduce(x)
    return x


def reduce_dict(d, ddp):
    """Named sums over processes: {name: float}, summed key by key in one all-reduce."""
    keys = list(d)
    t = all_reduce_sum(torch.tensor([float(d[k]) for k in keys], dtype=torch.float64), ddp)
    return dict(zip(keys, t.tolist()))


def sharded(model):
    """True for a model wrapped by FSDP2 (torch's fully_shard): its parameters are shards."""
    return hasattr(model, "unshard") and hasattr(model, "reshard")

# -----------------------------------------------------------------------------
# the metrics log and the stop signals


class JsonlLog:
    """Appends one JSON object per line to out_dir/metrics.jsonl (rank 0 only). A resumed run first
    cuts the file back to the lines it had when its checkpoint was saved, so the steps it replays
    are logged once."""

    def __init__(self, path, enabled, keep_lines=None):
        self.path, self.enabled = path, enabled
        if enabled and keep_lines is not None and os.path.exists(path):
            with open(path) as f:
                lines = f.readlines()[:keep_lines]
            with open(path, "w") as f:
                f.writelines(lines)

    def lines(self):
        if not os.path.exists(self.path):
            return 0
        with open(self.path) as f:
            return sum(1 for _ in f)

    def __call__(self, **kv):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(kv) + "\n")


STOP = {"signal": None}   # set by the first SIGINT/SIGTERM; the training loop saves and stops after its step


def _request_stop(signum, frame):
    if STOP["signal"] is not None:   # a second Ctrl-C: stop now, without saving
        raise KeyboardInterrupt
    STOP["signal"] = signum
    print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to abort)", file=sys.stderr)


def catch_stop_signals():
    """From here on, a SIGINT or SIGTERM asks the training loop to save and stop after its step."""
    STOP["signal"] = None
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _request_stop)

# -----------------------------------------------------------------------------
# failing cleanly


def cli(main, quiet_pipe=False):
    """Run a script's main(). Bad input (a ValueError or a missing file, each naming the argument,
    file or line) ends in one line on stderr and exit status 2, with no traceback; set
    BACKTRACK_DEBUG=1 to see one. quiet_pipe: a reader that closes the pipe early (| head) ends
    the program silently, as it does any Unix tool."""
    if quiet_pipe:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        main()
    except (ValueError, OSError) as e:
        if os.environ.get("BACKTRACK_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
