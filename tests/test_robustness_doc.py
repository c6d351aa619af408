"""docs/robustness.md and the robustness tests stay in sync: every row of the doc's
tables names tests that exist, and every robustness test is named in the doc."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "robustness.md"
SUITE = [
    "tests/interop/test_bad_input.py",
    "tests/interop/test_timeouts.py",
    "tests/interop/test_limits.py",
    "tests/interop/test_abort_semantics.py",
    "tests/interop/test_reload_drain.py",
    "tests/interop/test_fuzz_live.py",
    "tests/interop/test_soak.py",
]
REF = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")


def _test_functions(path: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def _table_rows() -> list[str]:
    """Body rows of every table whose last column is headed "test"."""
    rows: list[str] = []
    in_test_table = False
    previous_was_table = False
    for line in DOC.read_text().splitlines():
        if not line.startswith("|"):
            previous_was_table = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not previous_was_table:  # a header row
            in_test_table = cells[-1] == "test"
        elif in_test_table and not set(line) <= set("|-: "):
            rows.append(line)
        previous_was_table = True
    return rows


def test_every_row_names_existing_tests() -> None:
    rows = _table_rows()
    assert len(rows) >= 40, f"only {len(rows)} table rows found in {DOC}"
    problems = []
    for row in rows:
        refs = REF.findall(row.rsplit("|", 2)[-2])
        if not refs:
            if "run by hand" in row:
                continue
            problems.append(f"row names no test: {row[:100]}")
        for path, name in refs:
            if not (ROOT / path).exists():
                problems.append(f"{path} does not exist")
            elif name not in _test_functions(path):
                problems.append(f"{path}::{name} is not a test function")
    assert not problems, "\n".join(problems)


def test_every_robustness_test_is_in_the_doc() -> None:
    named = set(REF.findall(DOC.read_text()))
    missing = [
        f"{path}::{name}"
        for path in SUITE
        for name in sorted(_test_functions(path))
        if (path, name) not in named
    ]
    assert not missing, "tests missing from docs/robustness.md:\n" + "\n".join(missing)


def test_soak_acceptance_numbers_recorded() -> None:
    text = DOC.read_text()
    assert "bench/soak.py --duration 300" in text
    assert "PLACEHOLDER" not in text, "record the 5-minute soak run in docs/robustness.md"
