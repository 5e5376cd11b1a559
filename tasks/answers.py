"""
The one answer parser: how rewards, evaluation and every verifier read a response's final answer.

A response ends in a '#### <answer>' line; its answer is the number there, in canonical text
(normalize_number), so that '1,000', '$1000' and '1000.' are the same answer. Everything here reads
the RESOLVED text (BKs applied, docs/backtrack-semantics.md §1) up to the end-of-text marker.
"""
import re

from tokenizer import EOT_TEXT

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")


def normalize_number(s):
    """Canonical text of a number: '1,000' -> '1000', '$3.50' -> '3.5', '-0' -> '0', '+7.' -> '7'.
    None if s is not a plain number (no units, no words: the verifiers are exact)."""
    s = s.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if not _NUMBER.fullmatch(s):
        return None
    sign = "-" if s[0] == "-" else ""
    whole, _, frac = s.lstrip("+-").partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    if whole == "0" and not frac:
        sign = ""  # -0 is 0
    return sign + whole + ("." + frac if frac else "")


def parse_answer(text):
    """The final answer of a response: the number on the line after the last '####' (text after an
    end-of-text marker is ignored), normalized by normalize_number; None when absent or not a number."""
    if text is None:
        return None
    text = text.split(EOT_TEXT)[0]
    if "####" not in text:
        return None
    return normalize_number(text.rsplit("####", 1)[1].split("\n")[0])


def response_lines(text):
    """Non-empty, stripped lines of a response, up to end-of-text."""
    return [l.strip() for l in text.split(EOT_TEXT)[0].split("\n") if l.strip()]
