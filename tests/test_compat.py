"""Run folders written by an earlier dlrun keep working: they resume exactly and predict.

tests/fixtures/run_v0.1.0 was made by dlrun 0.1.0 (commit caa6cf8, before the run-folder
module existed) with

    dlrun model=mlp model.hidden=[16] trainer.epochs=3 trainer.batch_size=4 \
          logger.tensorboard=false device=cpu device.threads=1

and stopped by SIGTERM in epoch 2 (step 394). run_v0.1.0.expected.json holds the final and
best metrics of the same command run without interruption by that version.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import read_metrics, read_summary

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "run_v0.1.0"
EXPECTED = json.loads(FIXTURE.with_name("run_v0.1.0.expected.json").read_text())


@pytest.fixture
def old_run(tmp_path) -> Path:
    run = tmp_path / "old_run"
    shutil.copytree(FIXTURE, run)
    return run


def test_an_old_interrupted_run_resumes_to_the_old_uninterrupted_result(old_run, dlrun_cli, tmp_path):
    proc = dlrun_cli(f"resume={old_run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = read_summary(old_run)
    assert summary["status"] == "completed"
    assert summary["resumed"][0]["step"] == 394
    # every figure 0.1.0 reported, exactly (later versions report more, e.g. macro F1)
    assert {k: summary["final"][k] for k in EXPECTED["final"]} == EXPECTED["final"]
    assert {k: summary["best"][k] for k in EXPECTED["best"]} == EXPECTED["best"]
    assert [m["epoch"] for m in read_metrics(old_run)] == [1, 2, 3]


def test_an_old_checkpoint_predicts(old_run, tmp_path):
    from conftest import DLRUN

    proc = subprocess.run([str(Path(DLRUN).with_name("dlrun-predict")), str(old_run), "--evaluate"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # best.pt of the old run is epoch 1's; these are its test numbers as dlrun 0.1.0 printed them
    assert "test split of digits: loss 1.3636  acc 0.7354" in proc.stdout
