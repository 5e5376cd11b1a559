"""
Sample from a trained checkpoint and watch it backtrack.

    python generate.py --prompt "7+5-3"                      # the default SFT checkpoint
    python generate.py --ckpt=out/grpo --policy=keep --num_samples=4 --temperature=1.0

On a terminal, each deleted token is struck through in red the moment its backtrack is sampled;
in plain output (a pipe, a file) a deletion is marked inline as [-x-]. The resolved answer of
every sample is printed after its trace.
"""
import os
import sys
from dataclasses import dataclass

import torch

from checkpoint import load_model
from common import cli, configure
from data import Rule, RuleFlags, count_backtracks
from decode import generate
from tasks import get_task, prompt_ids

DEFAULT_CKPT = "out/sft"   # what the README's main run (python train_sft.py) writes


@dataclass
class Config(RuleFlags):   # --policy, --slot_bans, --max_retries: the checkpoint's unless given (data.RuleFlags)
    prompt: str = ""                 # question text (wrapped in the task's prompt format unless --raw)
    ckpt: str = DEFAULT_CKPT         # checkpoint folder (this project's or a Hugging Face one)
    raw: bool = False                # feed the prompt text as is, without the task's format or chat template
    chat: bool = True                # the checkpoint's chat template around the task's user turn, when it has one
    temperature: float = 0.0         # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 128
    max_backtracks: int = -1         # cap on backtracks per sample; -1 = none
    trigger: float = 0.0             # > 0: BK where the verifier head's probability that the last token is wrong exceeds this
    num_samples: int = 1             # samples decoded together in one cache
    seed: int = 1337
    device: str = "cpu"
    color: str = "auto"              # auto | always | never


class Printer:
    """Renders one sample's actions as they arrive.

    TTY: the current line is redrawn from its segments, so a deleted token stays where it was,
    struck through in red. A deletion that reaches a line already finished (a deleted newline,
    or text above it) is shown inline as a struck-through marker instead. Plain output (a pipe, a
    file): deletions are marked [-x-], a deleted newline as [-⏎-], and nothing is redrawn.
    """
    STRIKE, RESET = "\x1b[9;31m", "\x1b[0m"

    def __init__(self, tok, out, tty):
        self.tok, self.out, self.tty = tok, out, tty
        self.line = []     # current line's segments: [text, struck]
        self.stack = []    # surviving tokens: index into self.line, or None if on an earlier line
        self.last_was_run = False

    def _show(self, text):
        return text.replace("\n", "⏎")

    def _redraw(self):
        self.out.write("\r\x1b[K" + "".join(self.STRIKE + t + self.RESET if s else t for t, s in self.line))

    def step(self, token, popped):
        tok = self.tok
        if token == tok.bk_id:
            if popped is None:
                return
            text = tok.decode([popped])
            where = self.stack.pop() if self.stack else None
            if not self.tty:
                self.out.write(f"[-{self._show(text)}-]")
            elif where is not None:
                self.line[where][1] = True
                self._redraw()
            else:   # deleted text from a finished line: grows at the front, so it reads in order
                if self.line and self.line[-1][1] == "run" and self.last_was_run:
                    self.line[-1][0] = self._show(text) + self.line[-1][0]
                else:
                    self.line.append([self._show(text), "run"])
                self._redraw()
            self.last_was_run = where is None
        elif token not in tok.stop_ids:
            self.last_was_run = False
            text = tok.decode([token])
            self.out.write(text)
            if "\n" in text:   # a finished line is never redrawn
                self.stack = [None] * len(self.stack)
                self.line = [[text.rsplit("\n", 1)[1], False]] if text.rsplit("\n", 1)[1] else []
                self.stack.append(None)
            else:
                self.line.append([text, False])
                self.stack.append(len(self.line) - 1)
        self.out.flush()


def check_args(cfg):
    """Every argument, before any work: one line naming the bad one."""
    if not cfg.prompt.strip():
        raise ValueError('--prompt is empty: pass the question, e.g. --prompt "7+5-3"')
    if cfg.temperature < 0:
        raise ValueError(f"--temperature={cfg.temperature}: must be >= 0 (0 = greedy)")
    if cfg.num_samples < 1:
        raise ValueError(f"--num_samples={cfg.num_samples}: must be >= 1")
    if cfg.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens={cfg.max_new_tokens}: must be >= 1")
    if cfg.top_k < 0 or not 0 < cfg.top_p <= 1:
        raise ValueError(f"--top_k={cfg.top_k} --top_p={cfg.top_p}: top_k >= 0 and 0 < top_p <= 1")
    Rule.from_flags(cfg)   # checks --policy, --slot_bans and --max_retries
    if not 0 <= cfg.trigger < 1:
        raise ValueError(f"--trigger={cfg.trigger}: a probability in [0, 1) (0 = off)")
    if cfg.color not in ("auto", "always", "never"):
        raise ValueError(f"--color={cfg.color}: expected auto, always or never")
    if not os.path.isfile(os.path.join(cfg.ckpt, "config.json")):
        raise ValueError(f"no checkpoint at --ckpt={cfg.ckpt!r}. Train one first (python train_sft.py) "
                         "or pass --ckpt=/path/to/checkpoint_folder")


def main(argv=None):
    cfg = Config()
    configure(cfg, sys.argv[1:] if argv is None else argv)
    check_args(cfg)
    model, tok = load_model(cfg.ckpt, device=cfg.device, chat=cfg.chat and not cfg.raw)
    meta = model.meta
    if cfg.trigger > 0 and model.verifier is None:
        raise ValueError(f"--trigger: {cfg.ckpt} has no verifier head (train one with train_sft.py --verifier_weight=1)")
    rule = Rule.from_flags(cfg, meta)
    task = None if cfg.raw or "task" not in meta else get_task(meta["task"], **meta.get("task_kwargs", {}))
    if task is not None:
        prompt = prompt_ids(tok, task, {"question": cfg.prompt})
    else:   # --raw, or a checkpoint without a task: the text as is, or one chat turn holding it
        prompt = tok.chat_ids(cfg.prompt) if tok.chat else tok.encode(cfg.prompt)
    text = tok.decode(prompt)
    room = model.config.block_size - len(prompt)
    if room < 1:
        raise ValueError(f"--prompt is {len(prompt)} tokens; the model's block holds {model.config.block_size}: "
                         "shorten the prompt")
    max_new_tokens = min(cfg.max_new_tokens, room)
    tty = sys.stdout.isatty() if cfg.color == "auto" else cfg.color == "always"
    print(f"[{cfg.ckpt} | {rule.policy} | T={cfg.temperature} | {cfg.num_samples} sample(s)]")
    if max_new_tokens < cfg.max_new_tokens:
        print(f"[the block leaves room for {max_new_tokens} new tokens after the prompt]")
    torch.manual_seed(cfg.seed)
    stream = cfg.num_samples == 1   # one sample streams live; several are decoded together, then shown
    printer = Printer(tok, sys.stdout, tty)
    if stream:
        sys.stdout.write(text)
    out = generate(model, [prompt] * cfg.num_samples, max_new_tokens=max_new_tokens, rule=rule,
                   temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   max_backtracks=None if cfg.max_backtracks < 0 else cfg.max_backtracks, seed=cfg.seed,
                   device=cfg.device, stop_ids=tok.stop_ids, trigger=cfg.trigger,
                   on_step=(lambda b, t, popped: printer.step(t, popped)) if stream else None)
    for i, o in enumerate(out):
        if not stream:
            print(f"\n--- sample {i + 1}")
            sys.stdout.write(text)
            p = Printer(tok, sys.stdout, tty)
            stack = []
            for t in o["response"]:   # replay the recorded actions through the same renderer
                popped = (stack.pop() if stack else None) if t == tok.bk_id else stack.append(t)
                p.step(t, popped)
        answer = tok.decode([t for t in o["resolved"] if t not in tok.stop_ids])
        print(f"\n[backtracks: {count_backtracks(o['response'], tok.bk_id)}]  resolved:\n{text}{answer}")
        if task is not None:
            print(f"[answer: {task.answer_of(answer)}]")


if __name__ == "__main__":
    cli(main, quiet_pipe=True)
