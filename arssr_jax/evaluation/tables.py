"""The paper's table layout: rows = scale x model, columns = metrics.

Outputs (all written atomically):

* ``results.md``: one Markdown table, mean over volumes (``mean ± std`` when there
  is more than one), and in simulated mode a second small table with the ground
  truth's own no-reference scores;
* ``results.csv``: one row per (scale, model): ``scale, model, kind, n_volumes`` then
  ``<metric>, <metric>_std`` for every metric (Dice: the mean ``dice`` and each class
  ``dice_csf``, ``dice_gm``, ``dice_wm``); the ground-truth row has an empty scale;
* ``results_per_volume.csv``: the unaggregated records, one row per (volume, scale, model).
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from arssr_jax.evaluation.protocol import BAND_EDGES, GROUND_TRUTH, SSIM_FACTOR_COLUMNS, Results
from arssr_jax.tempfiles import publish_mode

HEADINGS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "psnr_head": "PSNR head (dB)", "ssim_head": "SSIM head",
            "psi": "PSI", "lpc_si": "LPC-SI", "dice": "Dice", "ssim_luminance": "SSIM luminance",
            "ssim_contrast": "SSIM contrast", "ssim_structure": "SSIM structure"}
DIGITS = {"psnr": 2, "psnr_head": 2}
DEFAULT_DIGITS = 4


def _columns_of(metric: str) -> tuple:
    """The fixed columns one metric writes (ssim_factors: three; bands and dice add their own)."""
    return SSIM_FACTOR_COLUMNS if metric == "ssim_factors" else (metric,)


def metric_columns(results: Results) -> list[str]:
    """Every numeric column of the records, in the order the metrics were chosen."""
    columns = []
    for m in results.metrics:
        if m == "bands":
            columns.extend(sorted({k for r in results.records for k in r if k.startswith("mae_band_")},
                                  key=lambda k: int(k.rsplit("_", 1)[1])))
            continue
        columns.extend(_columns_of(m))
        if m == "dice":
            extra = sorted({k for r in results.records for k in r if k.startswith("dice_")})
            columns.extend(extra)
    return columns


def _stats(values) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), int(v.size)


def aggregate(results: Results) -> list[dict]:
    """One dict per table row, in table order (ground truth first, then scale x model)."""
    columns = metric_columns(results)
    rows = []
    keys = [(None, GROUND_TRUTH)] + [(s, m) for s in results.scales for m in results.models]
    for scale, model in keys:
        group = [r for r in results.records if r["model"] == model and r["scale"] == scale]
        if not group:
            continue
        row = {"scale": scale, "model": model, "kind": group[0]["kind"],
               "n_volumes": len({r["volume"] for r in group})}
        for c in columns:
            mean, std, _ = _stats(r.get(c) for r in group)
            row[c], row[f"{c}_std"] = mean, std
        rows.append(row)
    return rows


def _fmt(value, metric, digits=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    d = digits if digits is not None else DIGITS.get(metric, DEFAULT_DIGITS)
    return f"{value:.{d}f}"


def _cell(row, metric) -> str:
    mean = row.get(metric)
    if mean is None or math.isnan(mean):
        return "n/a"
    if row["n_volumes"] > 1:
        return f"{_fmt(mean, metric)} ± {_fmt(row[f'{metric}_std'], metric)}"
    return _fmt(mean, metric)


def for_volume(results: Results, volume) -> Results:
    """The records of one volume only (same models, scales and metrics)."""
    records = [r for r in results.records if r["volume"] == volume]
    return Results(records, results.models, results.scales, results.metrics, results.mode, results.degradation,
                   None, results.notes)


def markdown_by_volume(results: Results) -> str:
    """One section (heading = the file name) and table per volume."""
    volumes = list(dict.fromkeys(r["volume"] for r in results.records))
    return "\n".join(f"### {os.path.basename(str(v))}\n\n" + markdown(for_volume(results, v)) for v in volumes)


def band_markdown(results: Results, rows) -> str:
    """MAE per ground-truth intensity band (x 1000) and, per row, the worst ratio to tricubic."""
    bands = [c for c in metric_columns(results) if c.startswith("mae_band_")]
    if not bands:
        return ""
    names = [f"{BAND_EDGES[int(c.rsplit('_', 1)[1])]:.1f}-{BAND_EDGES[int(c.rsplit('_', 1)[1]) + 1]:.1f}" for c in bands]
    lines = ["", "Mean absolute error x 1000 by ground-truth intensity band (fraction of its range); last column: "
             "the largest ratio of a band's error to tricubic's at that scale (<= 1.10 is the target).", "",
             "| Scale | Model | " + " | ".join(names) + " | worst / tricubic |",
             "|---|---|" + "---:|" * (len(names) + 1)]
    tricubic = {r["scale"]: r for r in rows if r["model"] == "tricubic"}
    for r in rows:
        if r["model"] == GROUND_TRUTH:
            continue
        cells = ["n/a" if math.isnan(r[c]) else f"{1000 * r[c]:.2f}" for c in bands]
        base = tricubic.get(r["scale"])
        ratios = [r[c] / base[c] for c in bands if base and not math.isnan(r[c]) and base[c] > 0]
        worst = f"{max(ratios):.3f}" if ratios else "n/a"
        lines.append(f"| ×{r['scale']:g} | {r['model']} | " + " | ".join(cells) + f" | {worst} |")
    return "\n".join(lines) + "\n"


def markdown(results: Results, rows=None) -> str:
    rows = aggregate(results) if rows is None else rows
    n = len({r["volume"] for r in results.records})
    lines = []
    if results.mode == "simulated":
        lines.append(f"Simulated LR ({results.degradation} degradation) from {n} HR volume{'s' * (n != 1)}; "
                     "SR decoded onto the ground truth's grid. Higher is better for every metric.")
    else:
        lines.append(f"Real scans ({n} volume{'s' * (n != 1)}), no ground truth: no-reference sharpness only "
                     "(higher = sharper; not a measure of fidelity).")
    if results.notes:
        lines.append("; ".join(results.notes) + ".")
    if n > 1:
        lines.append("Values: mean ± standard deviation over volumes.")
    lines.append("")
    metrics = [c for m in results.metrics if m != "bands" for c in _columns_of(m)]
    main = [r for r in rows if r["model"] != GROUND_TRUTH]
    lines.append("| Scale | Model | " + " | ".join(HEADINGS[m] for m in metrics) + " |")
    lines.append("|---|---|" + "---:|" * len(metrics))
    for r in main:
        lines.append(f"| ×{r['scale']:g} | {r['model']} | " + " | ".join(_cell(r, m) for m in metrics) + " |")
    truth = [r for r in rows if r["model"] == GROUND_TRUTH]
    nr = [m for m in metrics if m in ("psi", "lpc_si")]
    if truth and nr:
        lines += ["", "Ground truth (HR) no-reference scores, for comparison:", "",
                  "| | " + " | ".join(HEADINGS[m] for m in nr) + " |", "|---|" + "---:|" * len(nr),
                  f"| {GROUND_TRUTH} | " + " | ".join(_cell(truth[0], m) for m in nr) + " |"]
    return "\n".join(lines) + "\n" + band_markdown(results, rows)


def csv_text(results: Results, rows=None) -> str:
    rows = aggregate(results) if rows is None else rows
    columns = metric_columns(results)
    header = ["scale", "model", "kind", "n_volumes"] + [x for c in columns for x in (c, f"{c}_std")]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        values = ["" if r["scale"] is None else f"{r['scale']:g}", r["model"], r["kind"], r["n_volumes"]]
        values += [_csv_number(r[c]) for c in header[4:]]
        writer.writerow(values)
    return buffer.getvalue()


def per_volume_csv_text(results: Results) -> str:
    columns = metric_columns(results)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["volume", "scale", "model", "kind"] + columns)
    for r in results.records:
        writer.writerow([r["volume"], "" if r["scale"] is None else f"{r['scale']:g}", r["model"], r["kind"]]
                        + [_csv_number(r.get(c)) for c in columns])
    return buffer.getvalue()


def _csv_number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(float(value))


def write_atomic(path, text: str) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        publish_mode(tmp)  # mkstemp made it private; the table gets a plain file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_tables(results: Results, out_dir, by_volume: bool = False) -> list[Path]:
    out_dir = Path(out_dir)
    rows = aggregate(results)
    text = markdown_by_volume(results) if by_volume else markdown(results, rows)
    return [write_atomic(out_dir / "results.md", text),
            write_atomic(out_dir / "results.csv", csv_text(results, rows)),
            write_atomic(out_dir / "results_per_volume.csv", per_volume_csv_text(results))]
