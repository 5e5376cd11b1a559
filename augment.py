"""
Augmentations: clean responses -> traces with errors and backtracks, all in token ids (research
notes §4): random and plausible injected errors, the edit path from a real wrong solution (lcs),
retries of a wrong step, and a task's depth-first search (dfs); build_traces mixes them into a
training set.

Every function here returns a response whose resolve() is exactly the clean response it was given
(docs/backtrack-semantics.md §1; build_traces asserts it). Error tokens are never BK or
end-of-text, and nothing is inserted after a final end-of-text token (the model must not learn to
write past the end).
"""
import difflib
import math

from data import Trace, count_backtracks, resolve
from tasks import prompt_ids


def _span(x, rng):
    """An int, or a random int from an inclusive (lo, hi) range."""
    return rng.randint(*x) if isinstance(x, (tuple, list)) else int(x)


def inject_random(clean_ids, bk_id, rng, n_errors, error_len=(1, 3), vocab=None, sampler=None,
                  eot_id=None, max_backtracks=None):
    """Random injection (notes 4.1): up to n_errors error spans at distinct random positions, each
    span followed by as many BKs, then the clean response carries on.

    Error tokens come from sampler(clean_ids, i, rng) -> ids (or None: no plausible error before
    clean_ids[i]), else uniformly from vocab (an id range or list), else from the response's own
    tokens. error_len (int or (lo, hi)) sets the span length when sampling from a vocabulary.
    max_backtracks caps the BKs written; the first error token never equals the clean token it
    stands in for (that would be no error at all).
    """
    clean = list(clean_ids)
    special = {bk_id, eot_id}
    assert bk_id not in clean, "a clean response has no BK"
    ends = eot_id is not None and clean and clean[-1] == eot_id
    n_pos = len(clean) if ends else len(clean) + 1  # position i: the errors go before clean[i]
    if sampler is None:
        pool = list(vocab) if vocab is not None else [t for t in clean if t not in special]
        pool = [t for t in pool if t not in special]
        if not pool:
            return clean
    budget = math.inf if max_backtracks is None else max_backtracks
    spans = {}
    for i in rng.sample(range(n_pos), n_pos):
        if len(spans) >= n_errors or budget <= 0:
            break
        right = clean[i] if i < len(clean) else None
        if sampler is not None:
            if right is None or right in special:
                continue
            err = sampler(clean, i, rng)
            if not err or err[0] == right or any(t in special for t in err):
                continue
        else:
            err = [rng.choice(pool) for _ in range(max(1, _span(error_len, rng)))]
            for _ in range(10):
                if err[0] != right:
                    break
                err[0] = rng.choice(pool)
            if err[0] == right:
                continue
        err = list(err)[:int(min(len(err), budget))]
        spans[i] = err
        budget -= len(err)
    out = []
    for i in range(len(clean) + 1):
        if i in spans:
            out += spans[i] + [bk_id] * len(spans[i])
        if i < len(clean):
            out.append(clean[i])
    return out


_SWAP_OPS = {"+": "-", "-": "+", "*": "/", "/": "*"}


def plausible_sampler(tok, max_extra=1):
    """A sampler for inject_random with errors a model plausibly makes: at a token with digits, the
    same token with one digit changed (most often by one: a near miss or a wrong operand); at an
    operator, a different operator; elsewhere none. The wrong token is sometimes followed by up to
    max_extra tokens of the right continuation, as when a slip is noticed a token late. Works on
    any tokenizer: the wrong text is encoded on its own, so a span may be several ids."""
    text_of = {}

    def text(t):
        if t not in text_of:
            s = tok.token_bytes(t).decode("utf-8", errors="replace")
            text_of[t] = None if "\ufffd" in s else s
        return text_of[t]

    def sample(clean, i, rng):
        s = text(clean[i])
        if not s:
            return None
        digits = [k for k, ch in enumerate(s) if ch in "0123456789"]
        if digits:
            k = rng.choice(digits)
            d = int(s[k])
            if rng.random() < 0.7:
                nd = (d + rng.choice((-1, 1))) % 10
            else:
                nd = rng.choice([x for x in range(10) if x != d])
            new = s[:k] + str(nd) + s[k + 1:]
        elif s.strip() in _SWAP_OPS:
            new = s.replace(s.strip(), _SWAP_OPS[s.strip()])
        else:
            return None
        err = tok.encode(new)
        more = clean[i + 1:i + 1 + rng.randint(0, max_extra)]
        return err + [t for t in more if t not in (tok.eot_id, tok.bk_id)]

    return sample


def lcs_trace(wrong_ids, right_ids, bk_id, max_divergences=None, max_backtracks=None):
    """LCS augmentation (notes 4.2): align a wrong response with the right one (difflib's matching
    blocks, a longest-common-subsequence style alignment, in token ids) and, at each divergence,
    write the wrong tokens, as many BKs, then the right tokens; shared stretches are written once.
    Only the first max_divergences divergences, and only those that fit in max_backtracks BKs in
    all, are written wrong-then-undone; the others are written right directly. A stretch the
    wrong response lacks is simply written (nothing to undo).

    A divergence never deletes a token only to type it again at the same slot. difflib can delete a
    span whose leading tokens are exactly what the right response writes next (wrong `1 5 1 2`,
    right `1 2`: delete `1 5`, keep `1 2`), which would give `1 5 BK BK 1 2`. Under `rewind` the
    deleted `1` is banned at its slot (docs/backtrack-semantics.md §4), so the trace would take an
    action of log-prob -inf; under `keep` it would teach a needless retype. So such leading tokens
    leave the divergence and are written once as shared text (`1 5 BK 2`), and a span that is
    right all through is just written. The first wrong token written is then never the token
    written at its slot after the BKs: no action of the trace is banned under either policy, and
    resolve(trace) == right still holds."""
    wrong, right = list(wrong_ids), list(right_ids)
    assert bk_id not in wrong and bk_id not in right, "inputs are plain responses"
    sm = difflib.SequenceMatcher(None, wrong, right, autojunk=False)  # autojunk would skip common tokens
    out, n_div, n_bk = [], 0, 0
    j = 0  # out resolves to right[:j] between divergences
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        # a divergence is written wrong only where the alignment still holds (j == j1); an earlier
        # divergence's shared tokens may have run past j1, and then this one is written right
        err = wrong[i1:i2] if tag != "equal" and j == j1 else []
        n = 0  # leading wrong tokens that are the right continuation: shared, not an error
        while n < len(err) and j + n < len(right) and err[n] == right[j + n]:
            n += 1
        out += err[:n]
        j += n
        err = err[n:]
        k = len(err)
        if k > 0 and (max_divergences is None or n_div < max_divergences) \
                and (max_backtracks is None or n_bk + k <= max_backtracks):
            out += err + [bk_id] * k
            n_div += 1
            n_bk += k
        if j < j2:
            out += right[j:j2]
            j = j2
    return out


RETRY_KINDS = ("retry", "retry_weak", "search")


def solution_lines_ids(tok, solution):
    """The ids of each line of a solution (its newline included, the last line without one), or
    None when tokenizing line by line does not give exactly tok.encode(solution) (a merge across a
    line break): then no line boundary in ids is safe to insert at."""
    lines = solution.split("\n")
    pieces = [tok.encode(l + "\n") for l in lines[:-1]] + [tok.encode(lines[-1])]
    return pieces if [t for x in pieces for t in x] == tok.encode(solution) else None


def inject_retry(tok, task, p, rng, kind="retry", retry_rate=0.5, max_backtracks=None):
    """Retry augmentation (Physics of Language Models part 2.2, arXiv 2408.16293): before each line
    of the clean solution, with probability retry_rate, the beginning of a line that cannot be
    written there yet, as many BKs, then the right line. kind 'retry': a variable whose inputs are
    not yet computed at that point; 'retry_weak': a variable from a later line, ready or not. The
    task names the candidates (task.retry_options(p, line_index, kind): a list, per candidate, of
    alternative beginnings as text); each beginning is encoded on its own and inserted at a line
    boundary in ids, so resolve(trace) == clean holds exactly.

    kind 'search' writes, before a chosen line, every failed attempt of a depth-first search
    (task.search_path(p, line_index)), each undone in turn: the trace of a model that looks for
    the next line by trying the variable its search stands on (our addition; see tasks.Deps).

    A wrong beginning never starts with the token the right line starts with (under `rewind` that
    token would be banned at its slot after the BKs, docs/backtrack-semantics.md §4). At most one
    retry (one search path) per line; when the coin flips choose no line, one line with candidates
    is chosen anyway, so a retry trace always retries. max_backtracks caps the BKs (retries that no
    longer fit are written shorter, or dropped; the budget goes to the chosen lines in random
    order, for 'search' in line order).
    Returns the response ids (clean + end-of-text, with the retries), or None when the task offers
    no retry options, the solution's lines cannot be cut in ids, or no retry fits."""
    options = getattr(task, "search_path" if kind == "search" else "retry_options", None)
    if options is None or kind not in RETRY_KINDS:
        return None
    pieces = solution_lines_ids(tok, p["solution"])
    if pieces is None or not all(pieces):
        return None
    special = {tok.bk_id, tok.eot_id}
    cands = []   # per line: candidates, each a list of alternatives; an alternative is a list of attempts in ids
    for k, piece in enumerate(pieces):
        per = []
        if kind != "search":   # retry kinds: one attempt; the alternatives are its beginnings
            groups = [[[a] for a in alts] for alts in options(p, k, kind)]
        else:                  # search: one candidate, one alternative, the whole path of attempts
            attempts = options(p, k)
            groups = [[attempts]] if attempts else []
        for alts in groups:
            alts = [[tok.encode(a) for a in path] for path in alts]
            alts = [path for path in alts if all(path) and path[0][0] != piece[0] and not special & set(sum(path, []))]
            if alts:
                per.append(alts)
        cands.append(per)
    eligible = [k for k, c in enumerate(cands) if c]
    if not eligible:
        return None
    chosen = [k for k in eligible if rng.random() < retry_rate] or [rng.choice(eligible)]
    if kind != "search":
        rng.shuffle(chosen)
    budget = math.inf if max_backtracks is None else max_backtracks
    wrong = {}
    for k in chosen:
        fits = [path for path in rng.choice(cands[k]) if sum(map(len, path)) <= budget]
        if fits:
            wrong[k] = rng.choice(fits)
            budget -= sum(map(len, wrong[k]))
    if not wrong:
        return None
    out = []
    for k, piece in enumerate(pieces):
        for attempt in wrong.get(k, ()):
            out += attempt + [tok.bk_id] * len(attempt)
        out += piece
    return out + [tok.eot_id]


def inject_search(tok, task, p, rng, max_backtracks=None, max_len=None):
    """The trace of a depth-first solver (task.search_trace(p, rng): characters, None for a BK; e.g.
    tasks.Sudoku), in ids: every wrong value it writes, and every token a dead end pops back through
    (the cascade), undone by BKs. Each character must be one token, so that a BK deletes exactly one
    value (byte tokens; a tokenizer that merges the characters of the solution gives None). None also
    when the search needs more than max_backtracks BKs or max_len actions: the caller trains on the
    clean solution instead (dropping a long search changes the mix; the share is counted in meta)."""
    if not hasattr(task, "search_trace"):
        raise ValueError(f"--augment=dfs: task {task.name!r} has no depth-first solver (search_trace); sudoku has one")
    actions = task.search_trace(p, rng, max_actions=max_len)
    if actions is None:
        return None
    ids = []
    for a in actions:
        t = [tok.bk_id] if a is None else tok.encode(a)
        if len(t) != 1:
            return None
        ids += t
    if max_backtracks is not None and ids.count(tok.bk_id) > max_backtracks:
        return None
    return ids + [tok.eot_id]


def random_vocab(tok):
    """Ids for uniform random errors: printable ASCII (and newline) for bytes, all of BPE."""
    if getattr(tok, "name", None) == "byte":
        return [10] + list(range(32, 127))
    special = set(getattr(tok, "special", {})) | {tok.eot_id, tok.bk_id}
    return [i for i in range(tok.n_vocab) if i not in special]


AUGMENTS = ("plausible", "random", "lcs", "dfs") + RETRY_KINDS
MIXED = ("plausible", "random", "lcs")   # what 'mixed' picks from (retry kinds are asked for by name)


def build_traces(tok, task, problems, rng, backtrack_ratio=0.5, max_backtracks=8, augment="plausible",
                 n_errors=(1, 2), error_len=(1, 3), allow_test=False, retry_rate=0.5, max_len=None):
    """Training traces: prompt ids = tasks.prompt_ids(tok, task, p) (chat-rendered when tok.chat); response = the clean solution ids
    plus end-of-text, augmented with backtracks for a backtrack_ratio share of the problems.

    augment: 'plausible' (near-miss errors), 'random' (uniform tokens), 'lcs' (align a wrong
    solution with the right one: p['wrong'], a str or list of str, when the problem carries one,
    else task.slip), 'retry' / 'retry_weak' (a line that cannot be written yet, or a later line,
    begun and undone before a line, with probability retry_rate per line: inject_retry; tasks with
    retry_options only, e.g. deps), 'dfs' (a depth-first solver's trace, inject_search: tasks with a
    search_trace, e.g. sudoku; a search without an undo, or whose trace would pass max_len tokens
    with its prompt, stays clean),
    'mixed' (one of plausible, random, lcs per trace), or a list of names to pick from. max_backtracks caps the BKs of any trace (0: every trace is clean). Where an
    augmentation finds nothing to do (no wrong solution, no plausible spot, a task without retry
    options) the trace falls back to plausible, then random, injection. Refuses test-split
    problems unless allow_test.
    """
    if not allow_test:
        task.check_train(problems)
    kinds = MIXED if augment == "mixed" else (augment,) if isinstance(augment, str) else tuple(augment)
    for k in kinds:
        assert k in AUGMENTS, f"unknown augmentation {k!r}: expected one of {AUGMENTS} or 'mixed'"
    bk, eot = tok.bk_id, tok.eot_id
    chosen = set(rng.sample(range(len(problems)), round(backtrack_ratio * len(problems))))
    sampler = plausible_sampler(tok)
    vocab = random_vocab(tok)
    traces = []
    for i, p in enumerate(problems):
        prompt = prompt_ids(tok, task, p)
        clean = tok.encode(p["solution"]) + [eot]
        resp, kind = clean, "clean"
        if i in chosen and max_backtracks != 0:
            kind = rng.choice(kinds)
            if kind == "lcs":
                wrong = p.get("wrong") or task.slip(p, rng)
                if isinstance(wrong, (list, tuple)):
                    wrong = rng.choice(wrong)
                if wrong:
                    resp = lcs_trace(tok.encode(wrong) + [eot], clean, bk, max_backtracks=max_backtracks)
            elif kind in RETRY_KINDS:
                resp = inject_retry(tok, task, p, rng, kind, retry_rate, max_backtracks) or clean
            elif kind == "dfs":   # a search that needed no undo, or did not fit, is a clean trace
                resp = inject_search(tok, task, p, rng, max_backtracks, None if max_len is None else max_len - len(prompt) - 1) or clean
                kind = "dfs" if bk in resp else "clean"
            n = _span(n_errors, rng)
            if bk not in resp and kind in ("lcs", "plausible") + RETRY_KINDS:
                resp = inject_random(clean, bk, rng, n, sampler=sampler, eot_id=eot, max_backtracks=max_backtracks)
                kind = "plausible"
            if bk not in resp and kind != "clean":
                resp = inject_random(clean, bk, rng, n, error_len=error_len, vocab=vocab, eot_id=eot,
                                     max_backtracks=max_backtracks)
                kind = "random"
        assert resolve(resp, bk) == clean, "an augmentation broke resolve(trace) == clean"
        traces.append(Trace(prompt, resp, meta=dict(augment=kind, n_bk=count_backtracks(resp, bk), index=i)))
    return traces

