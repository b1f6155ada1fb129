"""`shadowserve demo`: the faithful port agrees fully, the RGB/BGR-swapped one visibly does not."""

from __future__ import annotations

import re

from server.demo import run_demo


def summary_rows(output: str) -> dict[str, dict[str, str]]:
    """The demo's summary table, as {model: {column: cell}}, read by its own header."""
    table = [re.split(r"\s{2,}", line.strip()) for line in output.splitlines()]
    header = next(row for row in table if row[0] == "model")
    return {row[0]: dict(zip(header, row)) for row in table if row[0].startswith("classifier")}


def percent(cell: str) -> float:
    return float(cell.rstrip("%")) if cell != "-" else float("nan")


async def test_demo_summary_separates_the_faithful_port_from_the_buggy_one(capsys, tmp_path):
    assert await run_demo(requests=200, workdir=str(tmp_path)) == 0
    output = capsys.readouterr().out
    rows = summary_rows(output)
    faithful, buggy = rows["classifier"], rows["classifier_bgr"]
    assert percent(faithful["match"]) == 100.0 and percent(faithful["top-1 agree"]) == 100.0, output
    assert percent(buggy["match"]) < 80.0 and percent(buggy["top-1 agree"]) < 80.0, output
    for row in (faithful, buggy):
        assert int(row["compared"]) + int(row["skipped"]) == 200, output  # every shadowed request accounted for
