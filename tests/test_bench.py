"""The benchmarks run (at tiny sizes) and print well-formed results; speed itself is never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_data_pipeline_bench(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "data_pipeline.py"), "--samples", "600",
                           "--data-dir", str(tmp_path)], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "data_pipeline" and result["ratio"] > 0
    assert result["ratio"] == pytest.approx(result["dlrun_samples_per_s"] / result["torchvision_samples_per_s"])
    assert "ratio (dlrun / torchvision)" in proc.stdout
