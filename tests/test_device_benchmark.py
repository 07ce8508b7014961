"""eval/device_benchmark.py: the one prepared GPU benchmark, run here with --smoke on the CPU."""

import json
import subprocess
import sys

import pytest

from arssr_jax.testing.benchmarking import chip_peak
from scripts import ROOT  # tests/ is on sys.path: conftest.py

SCRIPT = ROOT / "eval" / "device_benchmark.py"
NOT_IN_SMOKE = {"training shipped"}


def run(out, *options, timeout=900):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *options], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "device_benchmark.json").read_text()), (out / "device_benchmark.md").read_text()


def unexplained_nulls(value, where="report"):
    """Paths of null fields that their dict's ``why_empty`` does not explain."""
    found = []
    if isinstance(value, dict):
        why = value.get("why_empty", {})
        for key, item in value.items():
            if item is None and not why.get(key):
                found.append(f"{where}.{key}")
            found += unexplained_nulls(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += unexplained_nulls(item, f"{where}[{i}]")
    return found


def test_smoke_run_fills_every_field(tmp_path):
    report, table = run(tmp_path, "--smoke", "--seconds", "600")  # a generous limit: a busy machine is no failure
    assert report["complete"] and report["smoke"]
    assert unexplained_nulls(report) == []
    skipped = NOT_IN_SMOKE | ({"torch reference"} if "torch" in report["environment"]["missing"] else set())
    for part in report["parts"]:
        if part["name"] in skipped:
            assert part["status"] == "skipped" and part["detail"], part
            continue
        assert part["status"] == "ok", part
        assert part["rows"] and all(row["status"] == "ok" for row in part["rows"]), part
        assert f"| {part['name']} |" in table
    assert report["environment"]["backend"] == "cpu"
    inference = report["parts"][1]["rows"][0]
    for field in ("wall_with_compile_s", "wall_s", "encode_s", "decode_s", "encoder_tflops_per_s",
                  "decoder_tflops_per_s"):
        assert inference[field] > 0, field
    assert set(inference["why_empty"]) == {"peak_flops_per_s", "encoder_fraction_of_peak",
                                           "decoder_fraction_of_peak", "peak_device_memory_bytes"}
    assert [t["value"] is not None for t in report["targets"]][:2] == [True, False]  # no peak for a CPU
    assert all(r["value"] > 0 for r in report["ratios"]) or "torch reference" in skipped


def test_a_run_out_of_time_skips_its_parts_and_still_writes_its_report(tmp_path):
    report, table = run(tmp_path, "--smoke", "--seconds", "1", timeout=60)
    assert report["complete"] and all(part["status"] == "skipped" for part in report["parts"])
    assert "would start with" in report["parts"][0]["detail"] and "skipped" in table
    assert unexplained_nulls(report) == []


@pytest.mark.parametrize("kind, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12), ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H200", "float32", 495e12), ("NVIDIA A100-SXM4-80GB", "bfloat16", None), ("cpu", "float32", None)])
def test_the_chip_peak_comes_from_the_device_name(kind, dtype, peak):
    rate, text = chip_peak(kind, dtype)
    assert rate == peak and text
