"""generate.py's renderer: deletions are marked where they happen, in plain and TTY output."""
import io
import re

from tokenizer import Tokenizer
from generate import Printer


def render(events, tty):
    tok = Tokenizer("byte")
    out = io.StringIO()
    p = Printer(tok, out, tty)
    stack = []
    for ch in events:
        t = tok.bk_id if ch == "<" else tok.encode(ch)[0]
        popped = (stack.pop() if stack else None) if t == tok.bk_id else stack.append(t)
        p.step(t, popped)
    return out.getvalue()


def test_plain_marks_each_deletion():
    assert render("3+5=9<8\n#", tty=False) == "3+5=9[-9-]8\n#"
    assert render("12\n<<3", tty=False) == "12\n[-⏎-][-2-]3"


def test_tty_strikes_the_right_tokens_in_place():
    out = render("16-5=61<<11", tty=True)
    last = out.split("\r\x1b[K")[-1]          # the final redraw of the line
    plain = re.sub(r"\x1b\[[0-9;]*m", "", last)
    assert plain == "16-5=6111"
    struck = re.findall(r"\x1b\[9;31m(.*?)\x1b\[0m", last)
    assert struck == ["6", "1"]                # both deleted tokens, at their own places
    # a deletion that reaches an earlier line is shown inline, struck
    out = render("1\n<2", tty=True)
    assert "\x1b[9;31m⏎\x1b[0m" in out and out.endswith("2")
    out = render("17\n1<<<<4", tty=True)    # back over the newline into the line above
    last = out.split("\r\x1b[K")[-1]
    assert re.findall(r"\x1b\[9;31m(.*?)\x1b\[0m", last) == ["1", "17⏎"]   # in written order
    assert out.endswith("4")
