"""The paper's table layout: rows = scale x model, columns = metrics.

Outputs (all written atomically):

* ``results.md``: one Markdown table, mean over volumes (``mean ± std`` when there
  is more than one), and in simulated mode a second small table with the ground
  truth's own no-reference scores;
* ``results.csv``: one row per (scale, model): ``scale, model, kind, n_volumes`` then
  ``<metric>, <metric>_std`` for every metric (Dice: the mean ``dice`` and each class
  ``dice_csf``, ``dice_gm``, ``dice_wm``); the ground-truth row has an empty scale;
* ``results_per_volume.csv``: the unaggregated records, one row per (volume, scale, model);
* ``versus_tricubic.md`` (simulated mode, when a model is scored beside tricubic): per
  volume and scale, each model's difference from tricubic in every fidelity and sharpness
  metric scored (PSNR, SSIM, whole and head, LPC-SI; positive = better) and its worst
  intensity band's error ratio, with the count of comparisons it wins (a metric at least
  tricubic's; the worst band at most :data:`WORST_BAND_TARGET`): the targets of the model card.
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
# Compared with tricubic in versus_tricubic.md (higher is better for each). PSI is left out: it
# rewards the narrowest edges, and tricubic's overshoot scores as narrow; Dice is a segmentation's.
VERSUS_METRICS = ("psnr", "psnr_head", "ssim", "ssim_head", "lpc_si")
WORST_BAND_TARGET = 1.10  # a model's band error may exceed tricubic's by at most 10 %


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
        worst = worst_band_ratio(r, tricubic[r["scale"]]) if r["scale"] in tricubic else float("nan")
        lines.append(f"| ×{r['scale']:g} | {r['model']} | " + " | ".join(cells) + f" | {_fmt(worst, 'ratio', 3)} |")
    return "\n".join(lines) + "\n"


def worst_band_ratio(record: dict, tricubic: dict) -> float:
    """The largest ratio of a band's mean absolute error to tricubic's (NaN when no band is scored in both)."""
    bands = [k for k in record if k.startswith("mae_band_") and k[len("mae_band_"):].isdigit()]
    ratios = [record[k] / tricubic[k] for k in bands if _finite(record[k]) and _finite(tricubic.get(k)) and tricubic[k] > 0]
    return max(ratios) if ratios else float("nan")


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def versus_tricubic(results: Results) -> list[dict]:
    """One dict per (volume, scale, model other than tricubic): ``volume, scale, model``, the difference
    from tricubic of each :data:`VERSUS_METRICS` scored, ``worst_band`` (when bands were scored),
    ``wins`` and ``checks`` (how many of those comparisons the model meets). Empty without tricubic
    and for real scans (no ground truth: nothing to be faithful to)."""
    if results.mode != "simulated":
        return []
    tricubic = {(r["volume"], r["scale"]): r for r in results.records if r["model"] == "tricubic"}
    metrics = [m for m in VERSUS_METRICS if m in results.metrics]
    out = []
    for r in results.records:
        base = tricubic.get((r["volume"], r["scale"]))
        if base is None or r["model"] in ("tricubic", GROUND_TRUTH):
            continue
        row = {"volume": r["volume"], "scale": r["scale"], "model": r["model"], "wins": 0, "checks": 0}
        for m in metrics:  # a metric that could not be scored (NaN) is shown as n/a and not counted
            row[m] = r[m] - base[m] if _finite(r.get(m)) and _finite(base.get(m)) else float("nan")
            if _finite(row[m]):
                row["checks"] += 1
                row["wins"] += bool(row[m] >= 0)
        if "bands" in results.metrics:
            row["worst_band"] = worst_band_ratio(r, base)
            if _finite(row["worst_band"]):
                row["checks"] += 1
                row["wins"] += bool(row["worst_band"] <= WORST_BAND_TARGET)
        out.append(row)
    return out


def versus_tricubic_markdown(results: Results) -> str:
    """``versus_tricubic.md``: the :func:`versus_tricubic` rows, then each model's total."""
    rows = versus_tricubic(results)
    if not rows:
        return ""
    metrics = [m for m in VERSUS_METRICS if m in rows[0]]
    bands = "worst_band" in rows[0]
    band_text = (f"; worst band: the largest ratio of a band's mean absolute error to tricubic's (target <= "
                 f"{WORST_BAND_TARGET:.2f})" if bands else "")
    lines = [f"Each model against tricubic on the same LR: the difference in each metric (positive = better than "
             f"tricubic){band_text}; met: how many of these comparisons the model meets (a metric at least "
             f"tricubic's{', the worst band within its target' if bands else ''}).", "",
             "| Volume | Scale | Model | " + " | ".join(HEADINGS[m] for m in metrics) + (" | worst band" if bands else "")
             + " | met |",
             "|---|---|---|" + "---:|" * (len(metrics) + bands + 1)]
    for r in rows:
        cells = [f"{r[m]:+.{DIGITS.get(m, DEFAULT_DIGITS)}f}" if _finite(r[m]) else "n/a" for m in metrics]
        if bands:
            cells.append(_fmt(r["worst_band"], "worst_band", 3))
        lines.append(f"| {os.path.basename(str(r['volume']))} | ×{r['scale']:g} | {r['model']} | "
                     + " | ".join(cells) + f" | {r['wins']} of {r['checks']} |")
    return "\n".join(lines + [""] + versus_tricubic_totals(rows)) + "\n"


def versus_tricubic_totals(rows: list[dict]) -> list[str]:
    """One line per model: how many of its :func:`versus_tricubic` comparisons it meets."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        own = [r for r in rows if r["model"] == model]
        lines.append(f"{model}: {sum(r['wins'] for r in own)} of {sum(r['checks'] for r in own)} met "
                     f"({len(own)} volume-scale pair{'s' * (len(own) != 1)}).")
    return lines


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
    written = [write_atomic(out_dir / "results.md", text),
               write_atomic(out_dir / "results.csv", csv_text(results, rows)),
               write_atomic(out_dir / "results_per_volume.csv", per_volume_csv_text(results))]
    versus = versus_tricubic_markdown(results)
    if versus:
        written.append(write_atomic(out_dir / "versus_tricubic.md", versus))
    return written
