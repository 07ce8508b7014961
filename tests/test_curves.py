"""Training curves: `arssr-jax plot WORKDIR` draws log.jsonl into a PNG, and the TensorBoard
event files (tensorboardX) hold the scalars written."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from arssr_jax.cli import main
from arssr_jax.curves import FIGSIZE, DPI, plot_curves, read_log


def _write_log(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def _run_records():
    """An abandoned first run, then a run resumed once (steps 5-6 logged twice)."""
    bar = {"val_l1": 0.05, "val_psnr": 23.0, "val_psnr_by_scale": {"2": 25.5, "3": 22.5, "4": 21.0}}
    records = [{"step": 0, "event": "start", "config": "old", "interpolation": {}, "total_steps": 4},
               {"step": 1, "loss": 9.0, "lr": 1.0},
               {"step": 0, "event": "start", "config": "tiny", "interpolation": bar, "interpolation_name": "trilinear",
                "total_steps": 8}]
    for step in range(1, 7):
        records.append({"step": step, "loss": 0.1 / step, "lr": 1e-3 * 0.5 ** (step // 4), "samples_per_s": 10.0})
    records.append({"step": 4, "event": "validation", "val_l1": 0.04, "val_psnr": 24.0,
                    "val_psnr_by_scale": {"2": 26.0, "3": 23.5, "4": 22.0}})
    records.append({"step": 4, "event": "resume", "total_steps": 9})  # resumed with --steps 9
    for step in range(5, 9):  # the resumed run, from the checkpoint at step 4
        records.append({"step": step, "loss": 0.05 / step, "lr": 5e-4, "samples_per_s": 11.0})
    records.append({"step": 8, "event": "validation", "val_l1": 0.035, "val_psnr": 24.5,
                    "val_psnr_by_scale": {"2": 26.5, "3": 24.0, "4": 22.5}})
    records.append({"step": 8, "event": "end", "best_step": 8})
    return records


def _png_shape(path):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(str(path)).shape


def test_read_log_keeps_the_current_run(tmp_path):
    _write_log(tmp_path / "log.jsonl", _run_records(), tail='{"step": 9, "lo')  # a line cut by a kill
    log = read_log(tmp_path / "log.jsonl")
    assert log["start"]["config"] == "tiny"
    assert [r["step"] for r in log["train"]] == list(range(1, 9))
    assert log["train"][4]["loss"] == pytest.approx(0.05 / 5)  # the resumed run's record of step 5
    assert [r["step"] for r in log["validation"]] == [4, 8]
    assert log["end"]["best_step"] == 8
    assert log["total_steps"] == 9  # the resumed run's target, not the first run's 8
    from arssr_jax.curves import _title

    assert "step 8 of 9 - best checkpoint step 8" in _title(tmp_path, log)


def test_plot_writes_a_png(tmp_path):
    _write_log(tmp_path / "log.jsonl", _run_records())
    path = plot_curves(tmp_path)
    assert path == tmp_path / "curves.png"
    assert _png_shape(path)[:2] == (round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "log.jsonl"]  # no temporary left

    # a baseline run: one scale, no validation yet, a loss that is not positive everywhere
    one = tmp_path / "one"
    one.mkdir()
    _write_log(one / "log.jsonl", [
        {"step": 0, "event": "start", "interpolation": {"val_psnr": 30.0, "val_psnr_by_scale": {"2": 30.0}},
         "interpolation_name": "tricubic"},
        {"step": 1, "loss": 0.0, "lr": 1e-4}, {"step": 2, "loss": 0.5, "lr": 1e-4}])
    assert _png_shape(plot_curves(one / "log.jsonl", tmp_path / "baseline.png"))[:2] == (420, 1500)


def test_plot_command(tmp_path, capsys):
    _write_log(tmp_path / "log.jsonl", _run_records())
    out = tmp_path / "out.png"
    assert main(["plot", str(tmp_path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert _png_shape(out)[2] in (3, 4)

    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", str(empty)]) == 2
    assert "log.jsonl does not exist" in capsys.readouterr().err
    (empty / "log.jsonl").write_text(json.dumps({"step": 0, "event": "start"}) + "\n")
    assert main(["plot", str(empty)]) == 2
    assert "no training records yet" in capsys.readouterr().err
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "no" / "such" / "dir.png")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_plot_command_imports_neither_jax_nor_training(tmp_path):
    _write_log(tmp_path / "log.jsonl", _run_records())
    code = ("import sys\nfrom arssr_jax.cli import main\n"
            f"assert main(['plot', {str(tmp_path)!r}, '--quiet']) == 0\n"
            "print(sorted(m for m in ('jax', 'arssr_jax.training', 'orbax.checkpoint', 'tensorboardX') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert (tmp_path / "curves.png").is_file()


def test_event_files_hold_the_scalars(tmp_path):
    pytest.importorskip("tensorboardX")
    from arssr_jax.training.events import EventLog, read_scalars

    bar = {"val_l1": 0.05, "val_psnr": 23.0, "val_psnr_by_scale": {"2": 25.5, "3": 22.5}}
    events = EventLog(tmp_path, start_step=0)
    assert events.enabled and str(tmp_path) in events.message
    assert not list(tmp_path.glob("events.out.tfevents.*"))  # no file before the first scalar
    for step in (1, 2, 3):
        events.scalars(step, {"train/loss": 1.0 / step, "train/lr": 1e-3, "train/samples_per_s": None,
                              "train/grad_norm": float("nan")})
    events.validation(3, {"val_l1": 0.04, "val_psnr": 24.0, "val_psnr_by_scale": {"2": 26.0, "3": 23.0}},
                      bar, "trilinear")
    events.close()
    resumed = EventLog(tmp_path, start_step=3)  # a resumed run: a second file, later in name order
    resumed.scalars(3, {"train/loss": 0.25})
    resumed.close()

    files = sorted(tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 2
    scalars = read_scalars(tmp_path)
    assert scalars["train/loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (3, 0.25)]
    assert [s for s, _ in scalars["train/lr"]] == [1, 2, 3]
    assert "train/samples_per_s" not in scalars and "train/grad_norm" not in scalars  # None and NaN skipped
    assert scalars["val/psnr_x2"] == [(3, 26.0)] and scalars["interpolation/psnr_x3"] == [(3, 22.5)]
    assert scalars["val/l1"][0][1] == pytest.approx(0.04)
    assert np.isclose(scalars["interpolation/psnr"][0][1], 23.0)


def test_event_log_without_tensorboardx(tmp_path, monkeypatch):
    from arssr_jax.training.events import EventLog

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if not installed
    events = EventLog(tmp_path)
    assert not events.enabled and "tensorboardX is not installed" in events.message
    events.scalars(1, {"train/loss": 1.0})
    events.validation(1, {"val_psnr": 1.0}, {}, "trilinear")
    events.close()
    assert list(tmp_path.iterdir()) == []
