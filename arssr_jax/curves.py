"""Training curves of a workdir: ``log.jsonl`` -> one PNG (``arssr-jax plot WORKDIR``; also
written as ``WORKDIR/curves.png`` at the end of every run).

Three panels: the training loss (mean over each log interval, log scale), the learning rate,
and the validation PSNR per scale (and the mean over scales), each scale with its
interpolation bar (trilinear for ArSSR, tricubic for a baseline CNN) as a dashed line of the
same colour. Needs numpy and matplotlib only (no JAX), so the command starts fast.

The log is appended to across resumes: records before the last ``start`` record belong to an
abandoned run, and a step logged twice (by a run interrupted after its last checkpoint and
by the run that resumed from it) keeps its last record.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from arssr_jax.errors import ArSSRError

LOG_FILE = "log.jsonl"
PLOT_FILE = "curves.png"
FIGSIZE = (15.0, 4.2)  # inches; PNG at DPI dots per inch
DPI = 100


def read_log(path) -> dict:
    """The current run's records of a ``log.jsonl``: {"start": record or None, "train": [...],
    "validation": [...], "end": record or None}; train and validation sorted by step."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise ArSSRError(f"{path} does not exist: give a training workdir (arssr-jax train --workdir) "
                         "whose run has started") from None
    except OSError as error:
        raise ArSSRError(f"cannot read {path} ({error.strerror or error})") from None
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed run
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    if starts:
        records = records[starts[-1]:]
    train, validation, start, end, total = {}, {}, None, None, None
    for record in records:
        event, step = record.get("event"), int(record["step"])
        if event == "start":
            start = record
            total = record.get("total_steps")
        elif event == "resume":  # a resumed run may aim further than the first
            total = record.get("total_steps", total)
        elif event == "validation":
            validation[step] = record
        elif event == "end":
            end = record
        elif event is None and "loss" in record:
            train[step] = record
    return {"start": start, "train": [train[s] for s in sorted(train)],
            "validation": [validation[s] for s in sorted(validation)], "end": end, "total_steps": total}


def scale_key(scale: str):
    """Sort key of a validation scale's name: numbers in order, then any other names."""
    try:
        return (0, float(scale), "")
    except ValueError:
        return (1, 0.0, str(scale))


def _positive(values) -> bool:
    return bool(values) and all(v is not None and v > 0 and math.isfinite(v) for v in values)


def plot_curves(workdir, out=None) -> Path:
    """Draw the curves of ``workdir``'s log into ``out`` (default ``WORKDIR/curves.png``),
    written atomically; returns the path. ArSSRError when there is no log or nothing in it."""
    workdir = Path(workdir)
    if workdir.is_file() and workdir.name.endswith(".jsonl"):
        log_path, workdir = workdir, workdir.parent
    else:
        if not workdir.is_dir():
            raise ArSSRError(f"{workdir} is not a folder: give a training workdir (arssr-jax train --workdir)")
        log_path = workdir / LOG_FILE
    log = read_log(log_path)
    if not log["train"] and not log["validation"]:
        raise ArSSRError(f"{log_path} holds no training records yet; plot again once the run has logged a step")
    out = Path(out) if out is not None else workdir / PLOT_FILE
    if not out.parent.is_dir():
        raise ArSSRError(f"cannot write {out}: {out.parent} is not a folder")
    figure = _figure(log, title=_title(workdir, log))
    return _save(figure, out)


def _title(workdir: Path, log: dict) -> str:
    start, last = log["start"] or {}, 0
    for kind in ("train", "validation"):
        if log[kind]:
            last = max(last, int(log[kind][-1]["step"]))
    parts = [workdir.absolute().name or str(workdir)]
    if start.get("config"):
        parts.append(str(start["config"]))
    total = log.get("total_steps")
    parts.append(f"step {last}" + (f" of {total}" if total else ""))
    end = log["end"]
    if end and end.get("best_step") is not None:
        parts.append(f"best checkpoint step {end['best_step']}")
    return " - ".join(parts)


def _figure(log: dict, title: str):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.lines import Line2D

    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    loss_ax, lr_ax, psnr_ax = figure.subplots(1, 3)
    figure.suptitle(title)

    train = log["train"]
    steps = [r["step"] for r in train]
    losses = [r.get("loss") for r in train]
    loss_ax.plot(steps, losses, color="C0", lw=1.2)
    if _positive(losses):
        loss_ax.set_yscale("log")
    loss_ax.set(title="training loss (mean per log interval)", xlabel="step", ylabel="loss")

    lrs = [(r["step"], r["lr"]) for r in train if r.get("lr") is not None]
    if lrs:
        lr_ax.plot(*zip(*lrs), color="C1", lw=1.2, drawstyle="steps-pre")
        if _positive([v for _, v in lrs]):
            lr_ax.set_yscale("log")
    lr_ax.set(title="learning rate", xlabel="step", ylabel="learning rate")

    start = log["start"] or {}
    bar = start.get("interpolation") or {}
    bar_name = start.get("interpolation_name") or "interpolation"
    validation = log["validation"]
    bar_by_scale = bar.get("val_psnr_by_scale") or {}
    scales = sorted({s for r in validation for s in (r.get("val_psnr_by_scale") or {})} | set(bar_by_scale),
                    key=scale_key)
    handles = []
    for i, scale in enumerate(scales):
        colour = f"C{i % 10}"
        points = [(r["step"], r["val_psnr_by_scale"][scale]) for r in validation
                  if scale in (r.get("val_psnr_by_scale") or {})]
        if points:
            psnr_ax.plot(*zip(*points), color=colour, marker="o", ms=3, lw=1.2)
        if scale in bar_by_scale:
            psnr_ax.axhline(bar_by_scale[scale], color=colour, ls="--", lw=1.0)
        handles.append(Line2D([], [], color=colour, marker="o", ms=3, label=f"x{scale}"))
    if len(scales) != 1:  # the mean over scales (the only curve without scales)
        points = [(r["step"], r["val_psnr"]) for r in validation if r.get("val_psnr") is not None]
        if points:
            psnr_ax.plot(*zip(*points), color="black", marker="o", ms=3, lw=1.6)
        if bar.get("val_psnr") is not None:
            psnr_ax.axhline(bar["val_psnr"], color="black", ls="--", lw=1.2)
        if points or bar.get("val_psnr") is not None:
            handles.append(Line2D([], [], color="black", marker="o", ms=3, lw=1.6, label="mean"))
    if bar:
        handles.append(Line2D([], [], color="grey", ls="--", label=f"{bar_name} (the bar)"))
    if not validation:
        psnr_ax.text(0.5, 0.5, "no validation yet", transform=psnr_ax.transAxes, ha="center", va="center",
                     color="grey")
    if handles:
        psnr_ax.legend(handles=handles, fontsize="small", ncol=2 if len(handles) > 5 else 1)
    psnr_ax.set(title="validation PSNR per scale (dashed: interpolation)", xlabel="step", ylabel="PSNR (dB)")
    for ax in (loss_ax, lr_ax, psnr_ax):
        ax.grid(True, which="major", alpha=0.3)
    return figure


def _save(figure, out: Path) -> Path:
    from arssr_jax import tempfiles

    stem = out.name[:-len(out.suffix)] if out.suffix else out.name
    tempfiles.remove_stale(out.parent, stem, out.suffix)  # left by a run killed while writing
    try:
        tmp = tempfiles.make_temp(out.parent, stem, out.suffix)
    except OSError as error:
        raise ArSSRError(f"cannot write {out} ({error.strerror or error}); choose another --out") from None
    try:
        figure.savefig(tmp, format="png", dpi=DPI)
        tempfiles.publish_mode(tmp)
        os.replace(tmp, out)
    except OSError as error:
        raise ArSSRError(f"cannot write {out} ({error.strerror or error}); choose another --out") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


__all__ = ["LOG_FILE", "PLOT_FILE", "read_log", "plot_curves"]
