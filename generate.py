"""
Sample from a trained checkpoint and watch it backtrack.

    python generate.py --prompt "Q: 7+5-3=?"                 # the default SFT checkpoint
    python generate.py --ckpt out/grpo --policy keep --num_samples 4 --temperature 1.0

On a terminal, each deleted token is struck through in red the moment its backtrack is sampled;
in plain output (a pipe, a file) a deletion is marked inline as [-x-]. The resolved answer of
every sample is printed after its trace.
"""
import argparse
import os
import sys

import torch

from data import get_task, get_tokenizer, parse_answer
from model import GPT, generate

DEFAULT_CKPT = "out/sft"   # what the README's main run (python train_sft.py) writes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", required=True, help="question text (wrapped in the task's prompt format unless --raw)")
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help="checkpoint folder (project or Hugging Face layout)")
    p.add_argument("--raw", action="store_true", help="feed the prompt text as is, without the task's format")
    p.add_argument("--policy", choices=["keep", "rewind"], default=None,
                   help="context policy at inference (default: the one the checkpoint was trained with)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--max_backtracks", type=int, default=None, help="cap on backtracks per sample")
    p.add_argument("--num_samples", type=int, default=1, help="samples decoded together in one cache")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cpu")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    return p.parse_args(argv)


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
        elif token != tok.eot_id:
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


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.ckpt):
        sys.exit(f"error: no checkpoint at --ckpt={args.ckpt!r}. Train one first (python train_sft.py) "
                 f"or pass --ckpt=/path/to/checkpoint_folder.")
    model = GPT.from_pretrained(args.ckpt, device=args.device)
    cfg, meta = model.config, getattr(model, "meta", {})
    tok = get_tokenizer(cfg.tokenizer)
    if (tok.bk_id, tok.eot_id) != (cfg.bk_id, cfg.eot_id):
        sys.exit(f"error: tokenizer {cfg.tokenizer!r} does not match {args.ckpt}/config.json "
                 f"(bk {tok.bk_id} vs {cfg.bk_id}, eot {tok.eot_id} vs {cfg.eot_id})")
    policy = args.policy or meta.get("policy", "rewind")
    task = None if args.raw or "task" not in meta else get_task(meta["task"], **meta.get("task_kwargs", {}))
    text = task.prompt({"question": args.prompt}) if task is not None else args.prompt
    prompt = tok.encode(text)
    if not prompt:
        sys.exit("error: --prompt is empty")
    tty = sys.stdout.isatty() if args.color == "auto" else args.color == "always"
    print(f"[{args.ckpt} | policy={policy} | T={args.temperature} | {args.num_samples} sample(s)]")
    torch.manual_seed(args.seed)
    stream = args.num_samples == 1   # one sample streams live; several are decoded together, then shown
    printer = Printer(tok, sys.stdout, tty)
    if stream:
        sys.stdout.write(text)
    out = generate(model, [prompt] * args.num_samples, max_new_tokens=args.max_new_tokens, policy=policy,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   max_backtracks=args.max_backtracks, seed=args.seed, device=args.device,
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
        n_bk = o["response"].count(tok.bk_id)
        answer = tok.decode([t for t in o["resolved"] if t != tok.eot_id])
        print(f"\n[backtracks: {n_bk}]  resolved:\n{text}{answer}")
        if task is not None:
            print(f"[answer: {parse_answer(answer)}]")


if __name__ == "__main__":
    main()
