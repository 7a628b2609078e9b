"""docs/statistics.md holds exactly the power tables its script computes (no hand-copied figures)."""

import pathlib
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_power_tables_in_the_docs_are_the_computed_ones():
    tables = runpy.run_path(str(ROOT / "docs" / "statistics_tables.py"))["tables"]()
    assert tables in (ROOT / "docs" / "statistics.md").read_text(), (
        "docs/statistics.md is out of date: paste the output of PYTHONPATH=. python docs/statistics_tables.py")
