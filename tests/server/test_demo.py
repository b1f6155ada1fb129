"""`shadowserve demo`: the faithful port agrees fully, the RGB/BGR-swapped one visibly does not."""

from __future__ import annotations

import re

from server.demo import run_demo


async def test_demo_summary_separates_the_faithful_port_from_the_buggy_one(capsys, tmp_path):
    assert await run_demo(requests=200, workdir=str(tmp_path)) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("classifier")}
    assert set(rows) == {"classifier", "classifier_bgr"}, out

    def rates(line: str) -> list[float]:
        return [float(value) for value in re.findall(r"([\d.]+)%", line)]

    faithful_match, faithful_top1 = rates(rows["classifier"])
    buggy_match, buggy_top1 = rates(rows["classifier_bgr"])
    assert faithful_match == 100.0 and faithful_top1 == 100.0
    assert buggy_top1 < 80.0 and buggy_match < 80.0
    compared = int(rows["classifier"].split()[rows["classifier"].split().index("port") + 1])
    skipped = int(rows["classifier"].split()[rows["classifier"].split().index("port") + 2])
    assert compared + skipped == 200
