"""benchmarks/device_check.py in its --tiny mode: every part runs on a CPU and reports numbers."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_device_check_reports_every_part(tmp_path):
  report_path = tmp_path / "check.json"
  command = [
    sys.executable,
    "-m",
    "benchmarks.device_check",
    "--tiny",
    "--peak_tflops_float32=1",
    "--peak_tflops_bfloat16=2",
    f"--json_out={report_path}",
  ]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = json.loads(report_path.read_text())
  assert report["devices"]["backend"] == "cpu"
  assert report["devices"]["local_devices"] == 4  # conftest's fake devices
  assert report["pytest"]["returncode"] == 0 and "passed" in report["pytest"]["tail"][-1]
  rows = report["steps"]
  assert [(r["model"], r["px"], r["pairs"], r["dtype"]) for r in rows] == [
    ("ResNet-18", 32, 16, "float32"),
    ("ResNet-18", 32, 16, "bfloat16"),
  ]
  for row, peak in zip(rows, (1, 2), strict=True):
    assert row["devices"] == 4 and row["step_s"] > 0 and math.isfinite(row["loss"])
    assert row["images_per_s"] == pytest.approx(2 * row["pairs_per_s"])
    assert row["pairs_per_s"] == pytest.approx(16 / row["step_s"])
    assert row["tflops"] > 0
    assert row["mfu"] == pytest.approx(row["tflops"] / (peak * 4))
    assert f"| ResNet-18 | 32 | 16 | {row['dtype']} |" in result.stdout
  [pipeline] = report["pipeline"]
  assert pipeline["px"] == 32 and pipeline["images"] == 16 and pipeline["images_per_s"] > 0
