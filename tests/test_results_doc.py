"""docs/RESULTS.md quotes the experiment tables as the committed cell files give them, not as someone last pasted them.

The robustness grid is written up a cell at a time across sessions, by hand; a row pasted under the wrong heading or
a table left behind its cells is exactly the slip this catches (both happened). The tables are rebuilt here from the
cell files with the same aggregation `rmdistill table` runs, so every figure in them is traceable to a cell.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_jobs.experiment.aggregate import (
    SEED_TABLE_FILE,
    TABLE_FILE,
    load_cells,
    render_markdown,
    summarize,
    summarize_by_seed,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "RESULTS.md"
HEADER = "| rho | arm | alpha | seeds |"
# The experiment tables in the order RESULTS.md quotes them, by the folder of cells each one summarises.
FOLDERS = ["robustness-quick", "robustness"]


def quoted_tables(text: str) -> list[str]:
    """Every markdown table in ``text`` whose header is the experiment table's, as its lines joined."""
    lines = text.splitlines()
    tables = []
    for i, line in enumerate(lines):
        if line.startswith(HEADER):
            end = i
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            tables.append("\n".join(lines[i:end]))
    return tables


def test_quoted_tables_finds_each_table_whole_and_nothing_else():
    first = "| rho | arm | alpha | seeds | x |\n|---|\n| 0.2 | dpo |"
    text = "intro\n" + first + "\n\n| other | table |\n" + HEADER + " y |\n|--|"
    assert quoted_tables(text) == [first, HEADER + " y |\n|--|"]


@pytest.mark.parametrize("position,folder", list(enumerate(FOLDERS)))
def test_results_md_quotes_each_table_exactly_as_its_cells_give_it(position, folder):
    cells_dir = ROOT / "docs" / "results" / folder
    cells = load_cells(cells_dir)
    rebuilt = render_markdown(summarize(cells)).strip()
    assert (cells_dir / TABLE_FILE).read_text().strip() == rebuilt, f"{folder}/{TABLE_FILE} is stale: re-run the table"
    by_seed = render_markdown(summarize_by_seed(cells)).strip()
    assert (cells_dir / SEED_TABLE_FILE).read_text().strip() == by_seed, f"{folder}/{SEED_TABLE_FILE} is stale"
    tables = quoted_tables(RESULTS.read_text())
    assert len(tables) == len(FOLDERS)
    assert tables[position] == rebuilt
