"""Every result number a results page quotes must be in that study's committed tables.

The rule (also in ``docs/results/README.md``):

- **Pages.** Every ``docs/results/<study>/README.md`` is checked against the numbers of its own
  folder's ``tables*/*.md`` and ``tables*/*.csv`` (written by ``prunelab table`` from the study's
  store) and its other Markdown files (``summary*.md``, written by the folder's ``summarize.py``
  from the store; ``check_replacement.md``, by ``check_replacement.py``). The index
  ``docs/results/README.md`` is checked against the union of all studies' files.
- **What counts as a quoted number.** In the page's text and its Markdown tables, outside fenced
  code blocks, inline code spans and link targets: every number written with a decimal point
  (``89.06``, ``0.118``, ``1.06×``, the two halves of ``97.71 ± 0.15``), and every integer
  followed by a percent sign (``95 %``). A minus sign (``−`` or ``-``) belongs to the number.
  Version strings (``2.13.0``), arXiv identifiers, numbers followed by a time unit (``ms``, ``s``,
  ``min``, ``h``, ``worker-hours``: run times come from the run logs, not the stores' tables) and
  plain integers (counts, widths, dates, seeds) are not checked.
- **What counts as a match.** A number quoted with ``d`` decimals matches a table number ``v``
  when ``v``, ``100·v`` or ``v/100`` lies within half a unit of the ``d``-th decimal of it (so
  ``89.06`` matches the CSV's ``0.8906499…`` and the Markdown's ``89.06 ± 0.12``; ``1.70``
  matches ``1.703``). Thousands separators (``6,762``) are removed first. The check says that the
  number is in the study's tables at the precision quoted, not that it is the cell the sentence
  means; it is there to stop prose and tables drifting apart.
- **The allow-list.** Numbers that are not results stored in the tables (protocol parameters, wall
  times from the run log, numbers derived from table numbers: differences, ratios, ranges of
  differences) are listed in ``ALLOWED`` below, per page, as a short snippet of the page that
  contains them and the reason. Every number inside every occurrence of the snippet is skipped.
  A snippet that no longer occurs in its page fails the test, so the list cannot go stale.
"""

from __future__ import annotations

import bisect
import re
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"

# page (relative to docs/results) -> [(snippet of the page, reason)]
ALLOWED: dict[str, list[tuple[str, ...]]] = {
    "README.md": [
        (
            "At 98 %\nsparsity, iterative pruning gets",
            "96.67 ± 1.27 at 90 %",
            "the quickstart's own output (`make run`, `experiments/quickstart.yaml`), not a study",
        ),
    ],
    "lm/README.md": [
        ("Python 3.11", "a software version"),
        (
            "A GPT of 2.58M\nparameters and an LSTM of 2.29M",
            "model sizes in millions (parameters-*.csv: 2,578,560 / 2,285,696)",
        ),
        ("(19.2k and 32k tokens)", "the validation and test subsets' sizes in tokens (protocol)"),
        ("(1.46M in the LSTM and softmax weights", "model size, from the model definition"),
        ("obs-fast 9.4 and 8.0", "derived: 70 % perplexity minus dense (perplexity-*.csv)"),
        ("magnitude 6.7 / 19.0 points at 50 % and 66.3 / 124.4 at", "derived: perplexity minus dense"),
        ("magnitude and Wanda 7.4–9.3;\n  at 70 % obs-fast 5.5, magnitude 28.3", "derived: recovered minus control"),
        ("by magnitude by 5.5–22.8 points", "derived: recovered perplexities, magnitude minus obs-fast"),
        (
            "+80.1 → +29.3 points; 50 %: +317.4 → +114.8; 1 block: +17.4 → +5.8; 2 blocks: +94.8 → +28.0",
            "derived: structured perplexities minus dense 70.0 (summary.md)",
        ),
        ("for 50 % (1.69M)", "model size in millions (params table: 1,691,136 / 1,688,832)"),
        ("and 90 % (by 125.1)", "derived: AGP 200.0 minus small dense 74.9"),
        ("146k of its\n1.46M LSTM and softmax weights", "derived: 10 % of the pruned weights (model definition)"),
        ("layer error 0.62 of", "a bug report: the layer errors before the fix, not in the store"),
        ("against 0.036 for\nmagnitude 2:4 and 0.006", "a bug report: the layer errors before the fix"),
    ],
    "lobs/README.md": [
        ("6.7 % / 20 % / 65 % (sparsity 91.58 % overall)", "protocol: the spec's kept fractions"),
        ("54 % / 43 % / 6 % / 25 % (91.57 %)", "protocol: the spec's kept fractions"),
        ("0.9 / 5 / 30 % (1.47 % overall)", "protocol: the iterative targets of the spec"),
        ("(1.47 % / 0.85 % kept)", "protocol: the iterative targets of the spec"),
        ("to 1.47 % / 0.85 % kept", "protocol: the iterative targets of the spec"),
        ("loses\n  0.30 points", "derived: dense 98.01 minus obs-exact's 97.71 right after pruning"),
        ("is 1.2 points better", "derived: L-OBS 97.72 minus magnitude 96.48 (LeNet-5, right after pruning)"),
        ("loses 3.4 and 1.7 points", "derived: dense 98.01 / 99.05 minus 94.61 / 97.35"),
        ("is 8.42 % by its own", "derived: the paper's per-layer kept fractions times the layer sizes (shown)"),
        ("8.42 % kept (the 91.58 % sparsity", "derived: the paper's per-layer kept fractions times the layer sizes"),
        ("8.43 % kept (91.57 %)", "derived: LeNet-5's kept fractions times its layer sizes (shown)"),
        ("(the paper:\n  1.27 %)", "the paper's dense error, a citation"),
        ("(the paper: 1.76 %)", "the paper's dense error, a citation"),
        (
            "(epochs 11–40 noisy between 1.84 and 2.38 %, best epoch 1.74 %), so the paper's\n  1.76 %",
            "a measurement of the dense recipe made before the run (spec header), and the paper's dense error",
        ),
        ("LeNet-5 passes 1.27 %", "the paper's dense error, a citation"),
        ("The paper's 1.82 % after", "the paper's result, a citation"),
        ("(2.02 against 1.76 %)", "the paper's dense error, a citation (2.02 is in paper/summary.md)"),
        ("(4.94 → 4.43 %)", "the issue's independent single trial, not a prunelab run"),
    ],
    "study-d/README.md": [
        ("(−0.28 to +0.03 points)", "derived: layerwise-constant minus local, accuracy-sparsity-by-method-*.csv"),
    ],
    "mean-replacement/README.md": [
        (
            "the areas are abs_rs 0.591",
            "bp_rand 0.350",
            "read from figures/performance_profile.png (`prunelab plot`); the areas are in no table",
        ),
        (
            "is 37.7 % for all layers",
            "30.4 % for the first\n  dense layer",
            "read from figures/mean_replacement_scatter.png (`prunelab plot`); in no table",
        ),
        (
            "Its performance-profile area is 0.708",
            "0.356 for `bp_rs`",
            "read from figures/performance_profile.png (`prunelab plot`); in no table",
        ),
        (
            "by 5–20 % on average (13.7 % at",
            "19.9 % at half of the first conv)",
            "derived: 1 − (error with the mean) / (error removed), from paper/tables' mean-replacement table",
        ),
        ("from 0.127 to 0.090", "seed 0's training curve in paper/study-b-paper.db (epochs 9 and 12), not tabulated"),
    ],
    "study-a/README.md": [
        (
            "about 3.5 times\nas long",
            "0.14 h for the 180 runs",
            "benchmarks/study_engines.py's output (engine timings), not a study table",
        ),
        (
            "| raw, 0.01 | 96.91",
            "29.19 ± 9.89 |",
            "the lr / input-scaling selection store (study-a-select-training), whose tables are not committed",
        ),
        (
            "| MagL1 | 76.42",
            "| 76.28 |",
            "`selection_score.py` on the L1/L2 selection store, whose tables are not committed",
        ),
        ("costs 5.6 points dense", "derived: MagL2's dense 97.96 minus MagL1's 92.35 (summary.md)"),
        ("MagL1 held 97.02 % at 98 % and 28.86 % at 99.8 %", "runs outside the spec, not in the tables"),
        ("(64.57 against 55.50)", "`selection_score.py` on the selection store, not committed"),
        ("| single (one run at a time) | 9.63", "| batched | 3.11", "engine timings (s/run), a benchmark"),
        ("time of the runs in the spec: MNIST", "(1.95);", "worker-hours of the run log, not in the store's tables"),
        ("within 0.1 point of each other", "derived: 73.66 − 73.60 and 82.82 − 82.73 (long-select/selection.md)"),
        ("12,754 s of compute over the 128 runs (3.5 core-hours", "`prunelab status` on the store, not a table"),
        ("(6.0 MB with them, 0.55 MB without", "file sizes of the store, not results"),
        ("the two budgets are within 0.2 points", "derived: 230-epoch minus 15-epoch MagL1 (long/budgets.md)"),
        (
            "they gain 6.36–18.40\n  points",
            "derived: split minus global, MagL2 and OBD on mnist-rot (split/, summary.md)",
        ),
        ("unchanged within\n  1.1 points", "derived: MagL1 split minus global (split/, summary.md)"),
        ("MagL1 gains 2.3–4.0 points", "derived: mnist-rot MagL1, 230-epoch minus 15-epoch (long/budgets.md)"),
        ("MagL2 loses 3.8–4.9 points", "derived: mnist-rot MagL2, 15-epoch minus 230-epoch (long/budgets.md)"),
        (
            "by 28.0–32.7 points over MagL2 and 20.4–26.1 over OBD",
            "derived: mnist-rot, MagL1 minus MagL2 / OBD at 230 epochs (long/budgets.md)",
        ),
        (
            "(mnist-rot +2.3–3.0 points; mnist-back-rand level at\n  98.5 % and +1.5 / +2.9 above; mnist-back-image +0.5 to +3.6)",
            "derived: 784-30-10 MagL1, 230-epoch minus 15-epoch (long/budgets.md)",
        ),
    ],
}

_FENCE = re.compile(r"^```.*?^```[^\n]*$", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK_TARGET = re.compile(r"\]\([^)\s]*\)")
_VERSION = re.compile(r"\d+(?:\.\d+){2,}|\b\d{4}\.\d{4,5}\b")  # versions, arXiv identifiers
# a number with a decimal point, or an integer followed by a percent sign
_QUOTED = re.compile(r"(?<![\w.])([−-]?)(\d[\d,]*\.\d+|\d[\d,]*(?=\s?%))(?![\w.]*\d)")
# run times (wall time, latency) come from run logs, not from the stores' tables
_TIME = re.compile(r"\s?(?:ms|s|min|minutes|h|hours|worker-hours)\b")
_TABLE_NUMBER = re.compile(r"[−-]?\d[\d,]*(?:\.\d+)?(?:[eE][+-]?\d+)?")


def _strip(text: str) -> str:
    """The page without fenced code blocks, inline code spans, link targets and version strings."""
    for pattern in (_FENCE, _CODE, _LINK_TARGET, _VERSION):
        text = pattern.sub(lambda m: " " * len(m.group(0)), text)
    return text


def quoted_numbers(text: str, allowed: list[tuple[str, ...]] = ()) -> list[tuple[str, int]]:
    """The quoted result numbers of a page as (number as written, offset), allow-listed ones left out."""
    skipped = [False] * len(text)
    for snippet in allowed:
        for start, end in _occurrences(text, snippet):
            skipped[start:end] = [True] * (end - start)
    text = _strip(text)  # keeps every offset
    out = []
    for m in _QUOTED.finditer(text):
        if not skipped[m.start(2)] and not _TIME.match(text, m.end()):
            out.append((m.group(1) + m.group(2), m.start(2)))
    return out


def _occurrences(text: str, entry: tuple[str, ...]) -> list[tuple[int, int]]:
    """Where an allow-list entry covers the page: ``(snippet, reason)``, every occurrence of the
    snippet; ``(first, last, reason)``, from each occurrence of ``first`` to the end of the next
    ``last`` (a table's rows, say)."""
    if len(entry) == 2:
        return [(m.start(), m.end()) for m in re.finditer(re.escape(entry[0]), text)]
    first, last = entry[0], entry[1]
    spans = []
    for m in re.finditer(re.escape(first), text):
        end = text.find(last, m.end())
        if end >= 0:
            spans.append((m.start(), end + len(last)))
    return spans


def table_numbers(paths) -> list[float]:
    """Every number in the given table and summary files, and 100× and 1/100 of it, sorted."""
    values: set[float] = set()
    for path in paths:
        for token in _TABLE_NUMBER.findall(path.read_text()):
            v = float(token.replace(",", "").replace("−", "-"))
            values.update((v, 100.0 * v, v / 100.0))
    return sorted(values)


def matches(quoted: str, values: list[float]) -> bool:
    """Whether the number as written is within half a unit of its last decimal of one of ``values``."""
    number = quoted.replace(",", "").replace("−", "-")
    decimals = len(number.split(".")[1]) if "." in number else 0
    q = float(number)
    half = 0.5 * 10.0**-decimals * (1 + 1e-9)
    i = bisect.bisect_left(values, q - half)
    return i < len(values) and values[i] <= q + half


def study_files(folder: Path) -> list[Path]:
    """A study's summaries and tables, those of earlier runs kept in subfolders included."""
    files = sorted(f for f in folder.rglob("*.md") if f.name != "README.md" and not f.parent.name.startswith("tables"))
    for tables in sorted(t for t in folder.rglob("tables*") if t.is_dir()):
        files += sorted(tables.glob("*.md")) + sorted(tables.glob("*.csv"))
    return files


def pages() -> list[tuple[str, Path, list[Path]]]:
    """(page name, page, the table files it is checked against) for the index and every study."""
    studies = sorted(p.parent for p in RESULTS.glob("*/README.md"))
    out = [(p.name + "/README.md", p / "README.md", study_files(p)) for p in studies]
    out.append(("README.md", RESULTS / "README.md", [f for p in studies for f in study_files(p)]))
    return out


def unmatched(page: Path, files: list[Path], allowed: list[tuple[str, ...]]) -> list[str]:
    """The page's quoted numbers that no table number matches, each with its line."""
    text = page.read_text()
    values = table_numbers(files)
    bad = []
    for number, offset in quoted_numbers(text, allowed):
        if not matches(number, values):
            line = text.count("\n", 0, offset) + 1
            where = page.relative_to(RESULTS) if page.is_relative_to(RESULTS) else page
            bad.append(f"{where}:{line}: {number}")
    return bad


PAGES = pages()


@pytest.mark.parametrize("name,page,files", PAGES, ids=[p[0] for p in PAGES])
def test_every_quoted_number_is_in_the_committed_tables(name, page, files):
    assert files, f"{name}: no tables or summary to check against"
    assert unmatched(page, files, ALLOWED.get(name, [])) == []


def test_every_allow_list_entry_occurs_in_its_page_and_has_a_reason():
    names = {p[0] for p in PAGES}
    for name, entries in ALLOWED.items():
        assert name in names, name
        text = (RESULTS / name).read_text()
        for entry in entries:
            assert len(entry) in (2, 3) and entry[-1].strip(), f"{name}: {entry!r} has no reason"
            spans = _occurrences(text, entry)
            assert spans, f"{name}: stale allow-list entry {entry[:-1]!r}"
            covered = [quoted_numbers(text[a:b]) for a, b in spans]
            assert all(covered), f"{name}: {entry[:-1]!r} covers no quoted number"


def test_a_planted_wrong_number_is_caught(tmp_path):
    name, page, files = next(p for p in PAGES if p[0] == "mean-replacement/README.md")
    text = page.read_text()
    assert "**89.06 ± 0.12 %**" in text
    wrong = tmp_path / "README.md"
    wrong.write_text(text.replace("**89.06 ± 0.12 %**", "**89.16 ± 0.12 %**"))
    assert unmatched(page, files, ALLOWED.get(name, [])) == []
    assert [b.rsplit(": ", 1)[1] for b in unmatched(wrong, files, ALLOWED.get(name, []))] == ["89.16"]


def test_the_rule_on_small_cases(tmp_path):
    (tmp_path / "t.csv").write_text("a,b\n0.8906499,0.0012\n0.95,−0.009189\n1.0567,6,762\n")
    text = (
        "Dense **89.06 ± 0.12 %**, `lr 0.05`, torch 2.13.0, 6,762 weights, 95 % of pairs, 3 seeds,\n"
        "see [x](figures/a1.5.png), −0.0092 and 1.06×.\n```sh\nrun --lr 0.3\n```\n"
    )
    assert [n for n, _ in quoted_numbers(text)] == ["89.06", "0.12", "95", "−0.0092", "1.06"]
    assert [n for n, _ in quoted_numbers(text, [("1.06×", "a ratio")])] == ["89.06", "0.12", "95", "−0.0092"]
    values = table_numbers([tmp_path / "t.csv"])
    assert all(matches(n, values) for n, _ in quoted_numbers(text))
    assert not matches("89.07", values)
    assert not matches("1.05", values)
    assert matches("1.06", values) and matches("1.057", values) and not matches("1.056", values)
