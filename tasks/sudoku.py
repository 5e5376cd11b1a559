"""
Sudoku: complete a small Sudoku grid, the task for backtracking as a learned search, with its exact
checks and a depth-first solver whose traces (data.inject_search) write and undo wrong values.
"""
from tasks.answers import response_lines
from tasks.base import SyntheticTask


class Sudoku(SyntheticTask):
    """Complete a small Sudoku (size x size, boxes of box_rows x box_cols), for backtracking as a
    learned search: a dead end (a cell with no value left that its row, column and box allow) is a
    lookup in the context, while choosing the right value at a cell with several allowed ones needs
    lookahead. That is the setting where a depth-first search pays off (Qin et al. 2025, "To
    Backtrack or Not to Backtrack").

    question 'sudoku .4..1./...' (rows, '.' a blank, '/' between rows), response the full grid, one
    row a line: '645213\\n...'. Cells are written in a fixed order (row-major), one token per cell
    (a digit, or the newline after a row), so under `rewind` a slot ban forbids exactly one value
    at one cell. The response has no '####' line: the answer (answer_of) is the grid's 36 digits.

    Problems have exactly one solution (checked by counting to two) and at least `min_guesses`
    guess points: blank cells that allow more than one value when the fill order reaches them on the
    way to the solution (givens and earlier cells filled, later blanks open), so a solver writing
    cells in this order has to guess there. guess_points() reports them.

    verify: the resolved response is size lines of size digits, the givens kept, every row, column
    and box a permutation of 1..size. steps: one check per blank cell, its value equal to the
    solution's (a missing cell fails). search_trace(): the response of a depth-first solver, with
    its wrong values written and undone by BKs (data.inject_search).

    Splits: blanks drawn from min_blanks..max_blanks; a harder split is the same task with more
    blanks (e.g. min_blanks=20,max_blanks=22, more guess points, deeper searches).
    """
    name = "sudoku"

    def __init__(self, size=6, box_rows=2, box_cols=3, min_blanks=14, max_blanks=18, min_guesses=1,
                 n_train=20000, n_test=500):
        if box_rows * box_cols != size or not 1 <= min_blanks <= max_blanks <= size * size or size > 9:
            raise ValueError(f"sudoku: bad settings size={size}, box {box_rows}x{box_cols}, "
                             f"blanks {min_blanks}..{max_blanks}")
        self.size, self.box_rows, self.box_cols = size, box_rows, box_cols
        self.min_blanks, self.max_blanks, self.min_guesses = min_blanks, max_blanks, min_guesses
        self.n_default = dict(train=n_train, test=n_test)
        n = size
        # the cells each cell must differ from (its row, column and box), as flat indices r * n + c
        self.peers = [sorted(({r * n + j for j in range(n)} | {i * n + c for i in range(n)}
                              | {i * n + j for i in range(n) for j in range(n)
                                 if i // box_rows == r // box_rows and j // box_cols == c // box_cols}) - {r * n + c})
                      for r in range(n) for c in range(n)]

    # -- the grid: a list of size * size ints, 0 for a blank

    def allowed(self, grid, cell):
        """The values the filled peers of a cell leave it, ascending."""
        taken = {grid[j] for j in self.peers[cell]}
        return [v for v in range(1, self.size + 1) if v not in taken]

    def count_solutions(self, grid, limit=2):
        """Solutions of a grid, counted up to limit (most-constrained cell first)."""
        blanks = [i for i, v in enumerate(grid) if not v]
        if not blanks:
            return 1
        cell = min(blanks, key=lambda i: len(self.allowed(grid, i)))
        found = 0
        for v in self.allowed(grid, cell):
            grid[cell] = v
            found += self.count_solutions(grid, limit - found)
            grid[cell] = 0
            if found >= limit:
                break
        return found

    def _full_grid(self, rng):
        grid = [0] * (self.size * self.size)

        def fill(i):
            if i == len(grid):
                return True
            vals = self.allowed(grid, i)
            rng.shuffle(vals)
            for v in vals:
                grid[i] = v
                if fill(i + 1):
                    return True
            grid[i] = 0
            return False

        fill(0)
        return grid

    def _make(self, rng):
        while True:
            solution = self._full_grid(rng)
            grid = list(solution)
            for i in rng.sample(range(len(grid)), rng.randint(self.min_blanks, self.max_blanks)):
                grid[i] = 0
            if self.count_solutions(list(grid)) == 1 and len(self.guess_points(grid, solution)) >= self.min_guesses:
                return self.problem(self.format_grid(grid, "/"), solution)

    def guess_points(self, grid, solution):
        """The blank cells (flat indices) where the fill order meets more than one allowed value on
        the way to the solution."""
        g, out = list(grid), []
        for i, v in enumerate(grid):
            if not v:
                if len(self.allowed(g, i)) > 1:
                    out.append(i)
                g[i] = solution[i]
        return out

    def format_grid(self, grid, sep):
        n = self.size
        return sep.join("".join(str(v) if v else "." for v in grid[r * n:(r + 1) * n]) for r in range(n))

    def parse_question(self, question):
        """The grid (0 for a blank) of a question 'sudoku 12.4../...'."""
        rows = question.removeprefix("sudoku ").split("/")
        grid = [0 if ch == "." else int(ch) for row in rows for ch in row]
        assert len(rows) == self.size and len(grid) == self.size ** 2, f"not a {self.size}x{self.size} sudoku: {question!r}"
        return grid

    def problem(self, grid_text, solution=None):
        grid = self.parse_question(grid_text)
        if solution is None:   # a question on its own: solve it (the first solution, ascending values)
            solution = list(grid)
            self._solve(solution)
        return dict(question="sudoku " + grid_text, answer="".join(map(str, solution)),
                    solution=self.format_grid(solution, "\n"), grid=grid, cells=solution)

    def _solve(self, grid):
        blanks = [i for i, v in enumerate(grid) if not v]
        if not blanks:
            return True
        for v in self.allowed(grid, blanks[0]):
            grid[blanks[0]] = v
            if self._solve(grid):
                return True
        grid[blanks[0]] = 0
        return False

    # -- verification (of the resolved text)

    def read_grid(self, text):
        """The grid a response writes (a list of ints), or None unless it is exactly size lines of
        size digits in 1..size."""
        lines = response_lines(text)
        digits = "".join(lines)
        if len(lines) != self.size or any(len(l) != self.size for l in lines) \
                or not all("1" <= ch <= str(self.size) for ch in digits):
            return None
        return [int(ch) for ch in digits]

    def well_formed(self, text):
        return self.read_grid(text) is not None

    def answer_of(self, text):
        g = self.read_grid(text)
        return None if g is None else "".join(map(str, g))

    def valid(self, grid, p):
        """The givens of p kept and no two peers equal."""
        return all(not v or grid[i] == v for i, v in enumerate(p["grid"])) \
            and all(grid[i] != grid[j] for i in range(len(grid)) for j in self.peers[i])

    def verify(self, text, p):
        g = self.read_grid(text)
        return g is not None and self.valid(g, p)

    def steps(self, text, p):
        """One check per blank cell: the response's value there is the solution's."""
        digits = "".join(response_lines(text))
        return [i < len(digits) and digits[i] == str(p["cells"][i]) for i, v in enumerate(p["grid"]) if not v]

    def allowed_next(self, p, text):
        """The characters a checker of the rules allows next after the response text (resolved):
        the given or the newline that comes next, the values a blank cell's filled peers allow
        (none at a dead end), or, after the last cell, '' for the end. For an oracle-checked search
        (evaluate.oracle_search): it checks the rules, not the solution."""
        n = self.size
        if len(text) == n * (n + 1) - 1:
            return [""]
        if len(text) % (n + 1) == n:
            return ["\n"]
        cells = text.replace("\n", "")
        cell = len(cells)
        if p["grid"][cell]:
            return [str(p["grid"][cell])]
        grid = [int(c) for c in cells] + p["grid"][cell:]
        return [str(v) for v in self.allowed(grid, cell)]

    # -- material for data.inject_search

    def search_trace(self, p, rng, max_actions=None, prefer=None):
        """The actions of a depth-first solver that writes the response cell by cell, as a list of
        characters and None for a BK: at each blank cell it writes one of the values the filled
        peers allow (in random order, drawn anew at each visit; or in the order prefer(cell, values)
        gives, a fixed preference as a greedy decoder has), and moves on; at a blank cell with
        no value left it pops back, one BK per written token (givens and newlines too), to the
        previous blank cell, which then takes its next value, or, with none left, is popped in turn
        (the cascade). resolve(actions) is the solution. None if it needs more than max_actions."""
        n = self.size
        items = []   # per written token: a cell index (blank), or the fixed character (given, newline)
        for i, v in enumerate(p["grid"]):
            items.append(str(v) if v else i)
            if i % n == n - 1 and i < n * n - 1:
                items.append("\n")
        grid, left, actions, k = list(p["grid"]), {}, [], 0
        while k < len(items):
            if max_actions is not None and len(actions) > max_actions:
                return None
            it = items[k]
            if isinstance(it, str):
                actions.append(it)
                k += 1
                continue
            if k not in left:   # a new visit: the values allowed here now, in a random order
                left[k] = self.allowed(grid, it)
                if prefer is None:
                    rng.shuffle(left[k])
                else:
                    left[k] = list(reversed(prefer(it, left[k])))   # (taken from the end)
            if left[k]:
                grid[it] = left[k].pop()
                actions.append(str(grid[it]))
                k += 1
                continue
            del left[k]   # a dead end: pop back to the previous blank cell and free it
            while True:
                k -= 1
                assert k >= 0, "the search emptied the grid: the puzzle has no solution"
                actions.append(None)
                if not isinstance(items[k], str):
                    grid[items[k]] = 0
                    break
        assert [grid[i] for i in range(n * n)] == p["cells"], "the search found another solution"
        return actions
