"""dlrun-report on a real sweep: the table, its exports and the plots."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dlrun.tools.report import pareto_front

DLRUN_REPORT = str(Path(sys.executable).with_name("dlrun-report"))


def test_pareto_front():
    # (cost, score): lower cost and higher score are better
    points = [(1, 0.5), (2, 0.7), (3, 0.6), (4, 0.9), (4, 0.8), (5, 0.9), (1, 0.4)]
    assert pareto_front(points) == [0, 1, 3]


@pytest.mark.slow
def test_report_on_a_three_job_sweep(dlrun_cli, tmp_path):
    dlrun_cli("-m", "model.channels=[4],[8],[16,32]", "trainer.epochs=2", "device=cpu", check=True)
    (sweep,) = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run([DLRUN_REPORT, str(sweep), "--sort", "params", "--desc", "--csv", "t.csv",
                          "--markdown", "t.md", "--cost", "flops"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True).stdout
    assert "3 runs" in out and "model.channels=[16,32]" in out
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [r["overrides"] for r in rows] == ["model.channels=[16,32]", "model.channels=[8]", "model.channels=[4]"]
    assert [int(r["params"]) for r in rows] == sorted((int(r["params"]) for r in rows), reverse=True)
    assert all(r["status"] == "completed" and 0 < float(r["test"]) <= 1 and 0 < float(r["final_test"]) <= 1
               for r in rows)
    markdown = (tmp_path / "t.md").read_text().splitlines()
    assert markdown[0].startswith("| run | overrides |") and len(markdown) == 2 + 3
    for name in ("learning_curves.png", "pareto.png"):
        with Image.open(sweep / "plots" / name) as png:
            assert png.format == "PNG" and png.width > 300
    bad = subprocess.run([DLRUN_REPORT, str(sweep), "--sort", "nope"], capture_output=True, text=True)
    assert bad.returncode != 0 and "allowed columns: run, overrides" in bad.stderr
