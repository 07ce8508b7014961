"""Everything measured on one GPU in one run of at most 8 minutes, or on tiny sizes
on the CPU with --smoke (the tests run that: about a minute on 2 CPU cores).

    python eval/device_benchmark.py --out results/gpu        # on the GPU machine, first thing
    python eval/device_benchmark.py --smoke --out /tmp/db    # the same code path, tiny, on the CPU

Parts, in this order (each in its own process, with its own time budget):

- environment: Python, JAX and its devices, the NVIDIA driver, the packages present and missing;
- inference with the shipped model, then with the paper-size RDN (random weights): an LR volume
  of 91 x 109 x 91 (a 2 mm brain; 1 mm output at x2) at x2 and x4, bfloat16 and float32: wall
  time of ``upsample`` with and without compilation, encoder and decoder time, their FLOP/s
  against the chip's peak, peak device memory;
- training, the paper's recipe then the shipped one: the pmapped step of arssr_jax.training over
  all local devices, bfloat16 and float32: compile time, steps/s, samples/s, FLOP/s;
- the PyTorch reference (arssr_jax/testing/torch_reference.py) on the same GPU: inference
  encoding once and as the reference CLI does (the encoder again for every HR slab: a few slabs
  timed), and the paper's training step; "skipped" without torch or CUDA;
- the input pipeline (arssr_jax.data, the volume cache, one worker per host core) for both recipes;
- a sweep of the decoder's chunk size.

The whole run stops itself before --seconds (default 470, under 8 minutes): a part gets a share
of the time left and is killed at its end (what it measured so far is kept); a part that would
start too late is recorded as skipped; a part that fails is recorded with its one-line error and
the rest still runs. DIR/device_benchmark.json and DIR/device_benchmark.md are rewritten after
every measured case. In the JSON, a field is null only where its row's ``why_empty`` says why
(GPU-only fields on the CPU: the chip's peak, device memory, the driver).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

try:
    from arssr_jax.testing.benchmarking import best_time, chip_peak, one_line_error, synthetic_volume, timed
except ImportError as missing:  # the first check of the environment: the project itself
    sys.exit(f"device_benchmark: cannot import the project ({missing}); from the repository root run "
             "`PYTHONPATH=. python eval/device_benchmark.py ...`, or `pip install -e .` first")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_RECIPE = os.path.join(REPO, "train", "configs", "default_model.py")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "scipy", "nibabel", "grain", "tqdm",
            "ml_dtypes", "torch")
MARK = "@@benchmark "  # a child's messages on stdout start with this


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    share: float          # of the whole run's time
    needs: tuple = ()     # packages it cannot run without
    spec: dict = dataclasses.field(default_factory=dict)
    in_smoke: bool = True  # False: --smoke records it as skipped (too slow on a CPU)


DTYPES = ("bfloat16", "float32")
PARTS = (
    Part("environment", 0.06),
    Part("inference shipped", 0.15, ("jax", "flax"), {"model": "shipped"}),
    Part("training paper", 0.17, ("jax", "flax", "optax", "grain"), {"recipe": "paper"}),
    Part("torch reference", 0.17, ("torch", "jax", "grain")),
    Part("inference paper", 0.15, ("jax", "flax"), {"model": "paper"}),
    # Its tricubic-residual step alone compiles for over a minute on 2 CPU cores, even tiny: not in --smoke.
    Part("training shipped", 0.12, ("jax", "flax", "optax", "grain"), {"recipe": "shipped"}, in_smoke=False),
    Part("input pipeline", 0.10, ("jax", "grain", "nibabel")),
    Part("chunk sweep", 0.10, ("jax", "flax")),
)


def sizes(smoke: bool) -> dict:
    """What each part measures: the full sizes, or tiny ones for --smoke."""
    if smoke:  # one case of each kind
        return {"lr_shape": [6, 7, 6], "scales": [2.0], "dtypes": ["bfloat16"], "volume_shape": [128, 128, 128],
                "pipeline_volumes": 1, "recipes": ["paper"], "chunk_models": ["paper"], "chunks": [2**10, 2**12],
                "cli_slabs": 1, "measure_s": 0.2, "max_steps": 2, "workers": 1}
    return {"lr_shape": [91, 109, 91], "scales": [2.0, 4.0], "dtypes": list(DTYPES), "volume_shape": [160, 192, 160],
            "pipeline_volumes": 4, "recipes": ["paper", "shipped"], "chunk_models": ["shipped", "paper"],
            "chunks": [2**16, 2**18, 2**20, 2**21, 2**22], "cli_slabs": 3, "measure_s": 5.0, "max_steps": 50,
            "workers": os.cpu_count() or 1}


# -- the parent: runs the parts, writes the report --------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for device_benchmark.json and device_benchmark.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the tests)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="the whole run's time limit (default 470; with --smoke 180, a cap for busy machines)")
    parser.add_argument("--parts", nargs="+", choices=[p.name for p in PARTS], metavar="PART",
                        help="run only these parts (names as in the report); default all")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child[0], json.loads(args.child[1]))
    if not args.out:
        parser.error("--out DIR is required")
    os.makedirs(args.out, exist_ok=True)
    limit = args.seconds or (180.0 if args.smoke else 470.0)
    report = new_report(args, limit)
    run_parts(report, [p for p in PARTS if not args.parts or p.name in args.parts or p.name == "environment"],
              args, time.monotonic() + limit)
    report["complete"] = True
    write_report(report, args.out)
    print(f"wrote {os.path.join(args.out, 'device_benchmark.json')} and device_benchmark.md "
          f"in {report['elapsed_s']:.0f} s")
    return 0


def new_report(args, limit: float) -> dict:
    return {"command": shlex.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "smoke": bool(args.smoke), "limit_s": limit, "elapsed_s": 0.0, "complete": False,
            "sizes": sizes(args.smoke), "environment": {}, "parts": [], "targets": [], "ratios": []}


def run_parts(report: dict, parts, args, deadline: float) -> None:
    start = time.monotonic()
    runs = [not args.smoke or p.in_smoke for p in parts]
    for i, part in enumerate(parts):
        left = deadline - time.monotonic()
        share = left * part.share / sum(p.share for p, r in zip(parts[i:], runs[i:]) if r) if runs[i] else 0.0
        entry = {"name": part.name, "status": "running", "detail": "", "budget_s": round(share, 1),
                 "wall_s": 0.0, "rows": []}
        report["parts"].append(entry)
        missing = [n for n in part.needs if n in report["environment"].get("missing", [])]
        if not runs[i]:
            finish(entry, "skipped", "not in --smoke: it compiles for over a minute on a CPU")
        elif missing:
            finish(entry, "skipped", f"needs {', '.join(missing)} (missing: see the environment row; "
                   "docs/performance.md, GPU benchmark, says how to bring wheels)")
        elif share < (2.0 if args.smoke else 10.0):
            finish(entry, "skipped", f"would start with {left:.0f} s left of the {report['limit_s']:.0f} s limit")
        else:
            spec = {**part.spec, **sizes(args.smoke), "smoke": args.smoke, "deadline": time.time() + share - 1.0}
            run_part(entry, part.name, spec, share, report, args.out)
        if part.name == "environment" and entry["rows"]:
            report["environment"] = entry["rows"][0]
        report["elapsed_s"] = round(time.monotonic() - start, 1)
        write_report(report, args.out)


def finish(entry: dict, status: str, detail: str) -> None:
    entry["status"], entry["detail"] = status, detail


def run_part(entry: dict, name: str, spec: dict, timeout: float, report: dict, out: str) -> None:
    """Run a part in a child process; its rows go into ``entry`` (and the files) as they come."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", name, json.dumps(spec)],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)
        lines = queue.Queue()
        threading.Thread(target=pump, args=(proc.stdout, lines), daemon=True).start()
        timed_out = False
        while True:
            try:
                line = lines.get(timeout=max(0.0, t0 + timeout - time.monotonic()))
            except queue.Empty:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)  # the child and its workers: a new session of their own
                break
            if line is None:
                break
            if line.startswith(MARK):
                take_message(entry, json.loads(line[len(MARK):]))
                entry["wall_s"] = round(time.monotonic() - t0, 1)
                write_report(report, out)
        proc.wait()
        stderr.seek(0)
        last = [x.strip() for x in stderr.read().splitlines() if x.strip()][-1:] or [""]
    entry["wall_s"] = round(time.monotonic() - t0, 1)
    if entry["status"] == "skipped":
        return
    if timed_out:
        finish(entry, "timeout", f"stopped at its {timeout:.0f} s budget; {len(entry['rows'])} case(s) measured")
    elif proc.returncode != 0:
        finish(entry, "failed", f"exit status {proc.returncode}: {last[0][:300]}")
    else:
        finish(entry, "ok", f"{len(entry['rows'])} case(s)")


def pump(stream, lines: queue.Queue) -> None:
    """Every line of ``stream`` into ``lines``, then None."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def take_message(entry: dict, message: dict) -> None:
    if "skip" in message:
        finish(entry, "skipped", message["skip"])
    else:
        entry["rows"].append(message["row"])


def write_report(report: dict, out: str) -> None:
    report["targets"], report["ratios"] = targets(report), ratios(report)
    for name, text in (("device_benchmark.json", json.dumps(report, indent=2)),
                       ("device_benchmark.md", markdown(report))):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)


# -- the summary: the targets -------------------------------------------------------------------------


def find_row(report: dict, part: str, **match) -> dict | None:
    for entry in report["parts"]:
        if entry["name"] == part:
            for row in entry["rows"]:
                if row.get("status") == "ok" and all(row.get(k) == v for k, v in match.items()):
                    return row
    return None


def target(what: str, value, goal: str, why: str) -> dict:
    """One target: ``value`` against ``goal`` (">= 0.4", "<= 5"), or null values and why."""
    if value is None:
        return {"what": what, "goal": goal, "value": None, "met": None, "why_empty": {"value": why, "met": why}}
    bound = float(goal.split()[1])
    met = value >= bound if goal.startswith(">=") else value <= bound
    return {"what": what, "goal": goal, "value": round(value, 4), "met": bool(met), "why_empty": {}}


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def targets(report: dict) -> list:
    shipped = find_row(report, "inference shipped", dtype="bfloat16", scale=2.0)
    paper = find_row(report, "inference paper", dtype="bfloat16", scale=2.0)
    jax_step = find_row(report, "training paper", dtype="bfloat16")
    torch_step = find_row(report, "torch reference", case="training paper")
    pipeline = find_row(report, "input pipeline", recipe="paper")
    seconds = shipped["wall_with_compile_s"] if shipped else None
    per_gpu = jax_step["samples_per_s"] / jax_step["devices"] if jax_step else None
    return [
        target("whole brain x2, shipped model, bf16, with compilation (s)", seconds, "<= 5",
               "no inference shipped bfloat16 x2 result"),
        target("decoder FLOP/s / chip's bf16 dense peak (paper model, x2)",
               paper and paper["decoder_fraction_of_peak"], ">= 0.4",
               "no inference paper bfloat16 x2 result" if not paper else paper["why_empty"].get(
                   "decoder_fraction_of_peak", "")),
        target("training samples/s, JAX bf16 / PyTorch reference (paper recipe)",
               ratio(jax_step and jax_step["samples_per_s"], torch_step and torch_step["samples_per_s"]), ">= 1.5",
               "needs both the training paper and the torch reference results"),
        target("input pipeline samples/s / one device's step (paper recipe, bf16)",
               ratio(pipeline and pipeline["samples_per_s"], per_gpu), ">= 2",
               "needs both the input pipeline and the training paper results"),
    ]


def ratios(report: dict) -> list:
    """JAX against the PyTorch reference on the same machine (above 1: JAX faster)."""
    out = []

    def add(what, value, missing):
        out.append({"what": what, "value": None if value is None else round(value, 4),
                    "why_empty": {} if value is not None else {"value": missing}})

    for scale in report["sizes"]["scales"]:
        reference = find_row(report, "torch reference", scale=scale)
        for dtype in report["sizes"]["dtypes"]:
            ours = find_row(report, "inference paper", dtype=dtype, scale=scale)
            network = ours and ours["encode_s"] + ours["decode_s"]
            missing = f"needs the inference paper {dtype} x{scale:g} and the torch reference x{scale:g} results"
            add(f"inference x{scale:g}, paper model: reference encoding once (float32) / JAX {dtype} "
                "(encoder + decoder)",
                ratio(reference and reference["encode_once_s"], network), missing)
            add(f"inference x{scale:g}, paper model: reference as its CLI runs (float32) / JAX {dtype}",
                ratio(reference and reference["as_cli_s"], network), missing)
    reference = find_row(report, "torch reference", case="training paper")
    for dtype in report["sizes"]["dtypes"]:
        ours = find_row(report, "training paper", dtype=dtype)
        add(f"training samples/s, paper recipe: JAX {dtype} / reference (float32)",
            ratio(ours and ours["samples_per_s"], reference and reference["samples_per_s"]),
            f"needs the training paper {dtype} and the torch reference training results")
    return out


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"Device benchmark, {report['started']}: {env.get('device_kind', '?')} x {env.get('device_count', '?')}, "
             f"driver {env.get('driver') or 'n/a'}, jax {env.get('versions', {}).get('jax', '?')}, "
             f"{env.get('cpu_count', '?')} CPU cores; `python {report['command']}`"
             f"{' (smoke: tiny sizes)' if report['smoke'] else ''}; {report['elapsed_s']:.0f} s"
             f"{'' if report['complete'] else ' (incomplete)'}.", "",
             "| part | case | result |", "| --- | --- | --- |"]
    for entry in report["parts"]:
        if entry["status"] != "ok" or not entry["rows"]:
            lines.append(f"| {entry['name']} | | {entry['status']}: {entry['detail']} |")
        for row in entry["rows"]:
            result = row.get("summary") or f"{row.get('status')}: {row.get('error', '')}"
            lines.append(f"| {entry['name']} | {row.get('case', '')} | {result} |")
    lines += ["", "| target | goal | value | met |", "| --- | --- | --- | --- |"]
    for t in report["targets"]:
        value = "n/a: " + t["why_empty"]["value"] if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"| {t['what']} | {t['goal']} | {value} | {'' if t['met'] is None else t['met']} |")
    lines += ["", "| JAX against the PyTorch reference | ratio |", "| --- | --- |"]
    for r in report["ratios"]:
        lines.append(f"| {r['what']} | {'n/a' if r['value'] is None else format(r['value'], '.3g')} |")
    return "\n".join(lines)


# -- the child: one part ------------------------------------------------------------------------------


class Skip(Exception):
    """The whole part cannot run here (the reason is recorded as its detail)."""


def child(name: str, spec: dict) -> int:
    os.environ.setdefault("ARSSR_JAX_CACHE", "off")  # compile times are measured cold
    if spec["smoke"]:
        os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        CHILDREN[name](spec)
    except Skip as reason:
        emit({"skip": str(reason)})
    return 0


def emit(message: dict) -> None:
    print(MARK + json.dumps(message, default=float), flush=True)


def run_cases(spec: dict, cases) -> None:
    """Run ``(name, fn)`` cases in order; each gets an equal share of the part's time left and
    emits its row, or a row with its one-line error; cases past the deadline are skipped."""
    cases = list(cases)
    for i, (case, fn) in enumerate(cases):
        left = spec["deadline"] - time.time()
        if left <= 0:
            emit({"row": {"case": case, "status": "skipped", "error": "the part's time budget ran out"}})
            continue
        try:
            row = fn(min(spec["measure_s"], left / (len(cases) - i) / 3))
            emit({"row": {"case": case, "status": "ok", **row}})
        except Exception as error:  # recorded; the next case still runs
            emit({"row": {"case": case, "status": "failed", "error": one_line_error(error)}})


def why(row: dict, field: str, value, reason: str) -> None:
    """Set ``row[field] = value``, recording ``reason`` when the value is None."""
    row[field] = value
    row.setdefault("why_empty", {})
    if value is None:
        row["why_empty"][field] = reason


def device_facts(dtype: str):
    """(peak FLOP/s or None, which peak, in words; the why when None)."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return None, "none (CPU)", "GPU only: no peak FLOP rate is known for CPUs"
    rate, text = chip_peak(device.device_kind, dtype)
    return rate, text, text


def peak_memory(row: dict) -> None:
    """The process's peak device memory so far (a part's cases run smallest first)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    why(row, "peak_device_memory_bytes", stats.get("peak_bytes_in_use"),
        "GPU only: the CPU backend keeps no device memory statistics")


def flop_rates(row: dict, dtype: str, **flops_and_seconds) -> None:
    """``<name>_tflops_per_s`` and ``<name>_fraction_of_peak`` for each name=(flops, seconds)."""
    rate, text, reason = device_facts(dtype)
    row["peak_used"] = text
    why(row, "peak_flops_per_s", rate, reason)
    for name, (flops, seconds) in flops_and_seconds.items():
        achieved = flops / seconds
        row[f"{name}_tflops_per_s"] = round(achieved / 1e12, 6)
        why(row, f"{name}_fraction_of_peak", None if rate is None else round(achieved / rate, 4), reason)


# -- environment


def environment(spec: dict) -> None:
    versions, missing = {}, []
    for name in PACKAGES:
        versions[name] = package_version(name)
        if versions[name].startswith("missing"):
            missing.append(name)
    row = {"case": "this machine", "python": platform.python_version(), "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "versions": versions, "missing": missing}
    if "jax" not in missing:
        import jax

        devices = jax.local_devices()
        row.update(backend=jax.default_backend(), device_count=len(devices), device_kind=devices[0].device_kind,
                   process_count=jax.process_count())
        for dtype in DTYPES:
            row[f"peak_{dtype}"] = device_facts(dtype)[1]
    why(row, "driver", nvidia_driver(), "GPU only: nvidia-smi is not on this machine")
    row["summary"] = (f"{row.get('device_kind', 'no JAX')} x {row.get('device_count', 0)}, python {row['python']}, "
                      f"jax {versions['jax']}, torch {versions['torch']}; missing: {', '.join(missing) or 'nothing'}")
    emit({"row": {"status": "ok", **row}})


def package_version(name: str) -> str:
    """Its version, or "missing: <why>" (imported, so a missing dependency of it is named too;
    torch is only looked up: importing it takes seconds)."""
    import importlib
    import importlib.metadata
    import importlib.util

    try:
        if name == "torch":
            if importlib.util.find_spec(name) is None:
                return "missing: not installed"
        else:
            importlib.import_module(name)
    except Exception as error:  # ImportError, or a broken install
        return f"missing: {one_line_error(error)}"
    try:
        return importlib.metadata.version(name.split(".")[0].replace("orbax", "orbax-checkpoint"))
    except importlib.metadata.PackageNotFoundError:
        return "present"


def nvidia_driver() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


# -- inference


def smoke_model_config(config):
    """The same kind of model (encoder, decoder, padding, residual), tiny."""
    return config.replace(feature_dim=8, decoder_depth=4, decoder_width=16,
                          encoder_options={"num_blocks": 1, "num_layers": 1, "num_features": 8, "growth": 8})


def inference_model(which: str, dtype: str, smoke: bool):
    """(module, params): the shipped model, or the paper-size RDN with random weights."""
    import jax

    from arssr_jax.models import ModelConfig, build_model, init_params
    from arssr_jax.weights import load_model

    if which == "shipped":
        module, params, config = load_model(None)
        return build_model(config.replace(compute_dtype=dtype)), params
    config = ModelConfig(compute_dtype=dtype)
    module = build_model(smoke_model_config(config) if smoke else config)
    return module, init_params(module, jax.random.key(0))


def lr_volume(shape) -> np.ndarray:
    volume = synthetic_volume(tuple(shape), seed=0)
    return volume / volume.max()


def inference_part(spec: dict) -> None:
    volume = lr_volume(spec["lr_shape"])
    cases = []
    for dtype in spec["dtypes"]:  # bfloat16 first: the process's peak memory grows case by case
        for scale in spec["scales"]:
            cases.append((f"{dtype} x{scale:g}",
                          lambda budget, d=dtype, s=scale: inference_case(spec["model"], d, s, volume, spec, budget)))
    run_cases(spec, cases)


def inference_case(which: str, dtype: str, scale: float, volume, spec: dict, budget: float) -> dict:
    import jax

    from arssr_jax.coords import grid_for_scale
    from arssr_jax.flops import decoder_flops_per_voxel, encoder_flops_per_voxel
    from arssr_jax.inference import decode_grid, encode_volume, upsample

    jax.clear_caches()  # every case compiles afresh: "with compilation" is what a new process pays
    module, params = inference_model(which, dtype, spec["smoke"])
    _, cold = timed(upsample, volume, (module, params), scale=scale)
    warm = best_time(lambda: upsample(volume, (module, params), scale=scale), 2, budget)
    grid = grid_for_scale(volume.shape, scale)
    features = encode_volume(module, params, volume)
    encode_s = best_time(lambda: encode_volume(module, params, volume), 2, budget)
    decode_s = best_time(lambda: decode_grid(module, params, features, grid), 2, budget)
    config = module.config
    row = {"model": which, "dtype": dtype, "scale": scale, "lr_shape": list(volume.shape),
           "hr_shape": list(grid.shape), "hr_voxels": int(grid.num_voxels),
           "wall_with_compile_s": round(cold, 4), "wall_s": round(warm, 4),
           "compile_s": round(max(0.0, cold - warm), 4),
           "encode_s": round(encode_s, 4), "decode_s": round(decode_s, 4),
           "hr_voxels_per_s": round(grid.num_voxels / warm, 1)}
    flop_rates(row, dtype, encoder=(encoder_flops_per_voxel(config) * volume.size, encode_s),
               decoder=(decoder_flops_per_voxel(config) * grid.num_voxels, decode_s))
    peak_memory(row)
    row["summary"] = (f"{row['wall_with_compile_s']:.2f} s with compilation, {warm:.2f} s without; encoder "
                      f"{encode_s:.3f} s ({row['encoder_tflops_per_s']:.3g} TFLOP/s), decoder {decode_s:.3f} s "
                      f"({row['decoder_tflops_per_s']:.3g} TFLOP/s); {fraction_text(row)}{memory_text(row)}")
    return row


def fraction_text(row: dict) -> str:
    if row.get("peak_flops_per_s") is None:
        return "no peak known"
    parts = [f"{k.split('_')[0]} {100 * v:.1f} %" for k, v in row.items() if k.endswith("_fraction_of_peak")]
    return f"{', '.join(parts)} of {row['peak_used']}"


def memory_text(row: dict) -> str:
    peak = row.get("peak_device_memory_bytes")
    return "" if peak is None else f"; peak device memory {peak / 2**30:.2f} GiB"


# -- training


def recipe(name: str, dtype: str, smoke: bool):
    """The paper's or the shipped model's TrainConfig at ``dtype`` (tiny model and batch with smoke)."""
    from arssr_jax.training.config import load_config

    config = load_config("paper" if name == "paper" else SHIPPED_RECIPE)
    model = config.model.replace(compute_dtype=dtype)
    if not smoke:
        return config.replace(model=model)
    return config.replace(model=smoke_model_config(model),
                          data=dataclasses.replace(config.data, batch_size=2, samples_per_step=64))


def example_batch(make_example, data, size: int, volume_shape) -> dict:
    """``size`` training examples (``make_example(volume, data, rng)``) of a synthetic volume, stacked."""
    from arssr_jax.data import load_volumes

    volume = load_volumes([synthetic_volume(tuple(volume_shape), seed=1)], progress=False).arrays[0]
    examples = [make_example(volume, data, np.random.default_rng(i)) for i in range(size)]
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def step_flops(config, samples: int) -> float:
    """Useful FLOPs of a training step: 3x the forward pass (encoder per LR voxel, decoder per point)."""
    from arssr_jax.flops import decoder_flops_per_voxel, encoder_flops_per_voxel

    forward = (encoder_flops_per_voxel(config.model) * config.data.lr_size**3
               + decoder_flops_per_voxel(config.model) * config.data.samples_per_step)
    return 3.0 * samples * forward


def training_part(spec: dict) -> None:
    run_cases(spec, [(dtype, lambda budget, d=dtype: training_case(spec["recipe"], d, spec, budget))
                     for dtype in spec["dtypes"]])


def training_case(name: str, dtype: str, spec: dict, budget: float) -> dict:
    import jax

    from arssr_jax.training import make_optimizer, make_task, make_train_step
    from arssr_jax.training import parallel
    from arssr_jax.training.state import create_train_state

    config = recipe(name, dtype, spec["smoke"])
    devices = jax.local_device_count()
    batch_size = -(-config.data.batch_size // devices) * devices  # rounded up to fill every device
    task = make_task(config)
    tx, schedule = make_optimizer(config.optim, steps_per_epoch=100)
    state = parallel.replicate(create_train_state(task.init_params, tx, config.seed))
    batch = parallel.shard(example_batch(task.make_example, config.data, batch_size, spec["volume_shape"]))
    step = parallel.pmap_step(make_train_step(task.loss, tx, schedule, axis_name=parallel.AXIS_NAME))
    (state, metrics), first = timed(lambda: jax.block_until_ready(step(state, batch)))
    state, metrics = jax.block_until_ready(step(state, batch))
    steps, t0 = 0, time.perf_counter()
    while steps < spec["max_steps"] and (steps < 2 or time.perf_counter() - t0 < budget):
        state, metrics = step(state, batch)
        steps += 1
        if steps % 5 == 0 or steps < 3:
            jax.block_until_ready(metrics)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / steps
    loss = float(np.asarray(metrics["loss"]).ravel()[0])
    row = {"recipe": name, "dtype": dtype, "devices": devices, "batch": batch_size,
           "samples_per_step_K": config.data.samples_per_step, "lr_size": config.data.lr_size,
           "compile_s": round(max(0.0, first - step_s), 4), "step_s": round(step_s, 5), "timed_steps": steps,
           "steps_per_s": round(1 / step_s, 3), "samples_per_s": round(batch_size / step_s, 2),
           "loss": loss, "loss_finite": bool(np.isfinite(loss))}
    flop_rates(row, dtype, step=(step_flops(config, batch_size) / devices, step_s))
    peak_memory(row)
    row["summary"] = (f"{row['steps_per_s']:.3g} steps/s, {row['samples_per_s']:.4g} samples/s over {devices} "
                      f"device(s) (batch {batch_size}, K {row['samples_per_step_K']}); "
                      f"compile {row['compile_s']:.1f} s;"
                      f" {row['step_tflops_per_s']:.3g} TFLOP/s per device, {fraction_text(row)}{memory_text(row)}")
    return row


# -- the PyTorch reference


def torch_part(spec: dict) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"  # JAX (the data code imports it) must leave the GPU to torch
    try:
        import torch
    except ImportError as error:
        raise Skip(f"torch is not installed ({one_line_error(error)})") from None
    if not torch.cuda.is_available() and not spec["smoke"]:
        raise Skip(f"torch {torch.__version__} has no CUDA or sees no GPU (torch.version.cuda = {torch.version.cuda})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec["smoke"]:
        torch.set_num_threads(1)  # tiny work: more threads only spin, the more so on a busy machine
    volume = lr_volume(spec["lr_shape"])
    cases = [(f"inference x{s:g}", lambda budget, s=s: torch_inference(volume, s, device, spec, budget))
             for s in spec["scales"]]
    cases.append(("training paper", lambda budget: torch_training(device, spec, budget)))
    run_cases(spec, cases)


def torch_model(device, smoke: bool, train: bool = False):
    from arssr_jax.testing.torch_reference import make_reference

    options = {"feature_dim": 8, "g0": 8, "g": 8, "d": 1, "c": 1} if smoke else {}
    model = make_reference("RDN", **options).to(device)
    return model.train() if train else model


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def torch_inference(volume, scale: float, device, spec: dict, budget: float) -> dict:
    import torch

    from arssr_jax.coords import make_grid

    model = torch_model(device, spec["smoke"])
    lr = torch.from_numpy(volume)[None, None].to(device)
    hr = tuple(int(n * scale) for n in volume.shape)
    coords = torch.from_numpy(make_grid(hr)).view(hr[0], -1, 3).to(device)  # one HR slab per row, as the CLI
    with torch.no_grad():
        model.encoder(lr)  # the first call: CUDA and cuDNN set-up
        sync(device)

        def encode_once():
            features = model.encoder(lr)
            for i in range(hr[0]):
                model.decode(features, coords[i][None])
            sync(device)

        once_s = best_time(encode_once, 2, budget)
        cli_slabs = min(spec["cli_slabs"], hr[0])
        t0 = time.perf_counter()
        for i in range(cli_slabs):
            model(lr, coords[i][None])
        sync(device)
        cli_s = (time.perf_counter() - t0) / cli_slabs * hr[0]
    row = {"model": "paper RDN (reference mirror)", "dtype": "float32", "scale": scale, "device": str(device),
           "hr_voxels": int(np.prod(hr)), "encode_once_s": round(once_s, 4),
           "as_cli_s": round(cli_s, 3), "as_cli_slabs_timed": f"{cli_slabs} of {hr[0]}, extrapolated"}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    why(row, "peak_device_memory_bytes", peak, "GPU only: torch on the CPU keeps no allocator statistics")
    row["summary"] = (f"encode once {once_s:.3f} s; as the reference CLI {cli_s:.1f} s ({cli_slabs} of {hr[0]} slabs "
                      f"timed){memory_text(row)}")
    return row


def torch_training(device, spec: dict, budget: float) -> dict:
    import torch

    config = recipe("paper", "float32", spec["smoke"])
    model = torch_model(device, spec["smoke"], train=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.learning_rate, betas=(0.9, 0.999))
    from arssr_jax.data import make_sample  # the paper recipe's examples, as the JAX part makes them

    batch = example_batch(make_sample, config.data, config.data.batch_size, spec["volume_shape"])
    lr = torch.from_numpy(np.ascontiguousarray(np.moveaxis(batch["lr"], -1, 1))).to(device)  # (N, 1, X, Y, Z)
    coords, values = torch.from_numpy(batch["coords"]).to(device), torch.from_numpy(batch["values"]).to(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.l1_loss(model(lr, coords), values)
        loss.backward()
        optimizer.step()
        return loss.item()  # waits for the GPU

    _, first = timed(step)
    step()
    steps, t0 = 0, time.perf_counter()
    while steps < spec["max_steps"] and (steps < 2 or time.perf_counter() - t0 < budget):
        loss = step()
        steps += 1
    step_s = (time.perf_counter() - t0) / steps
    n = config.data.batch_size
    row = {"recipe": "paper", "dtype": "float32", "device": str(device), "batch": n,
           "samples_per_step_K": config.data.samples_per_step, "first_step_s": round(first, 4),
           "step_s": round(step_s, 5), "timed_steps": steps, "steps_per_s": round(1 / step_s, 3),
           "samples_per_s": round(n / step_s, 2), "loss": loss}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    why(row, "peak_device_memory_bytes", peak, "GPU only: torch on the CPU keeps no allocator statistics")
    row["summary"] = (f"{row['steps_per_s']:.3g} steps/s, {row['samples_per_s']:.4g} samples/s (batch {n}, "
                      f"K {row['samples_per_step_K']}, Adam, L1){memory_text(row)}")
    return row


# -- the input pipeline


def pipeline_part(spec: dict) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"  # a host-side measurement; grain's workers inherit this
    from arssr_jax.testing.benchmarking import write_volumes

    with tempfile.TemporaryDirectory(prefix="arssr-device-benchmark-") as folder:
        shape = spec["volume_shape"]
        paths = write_volumes(os.path.join(folder, "volumes"), spec["pipeline_volumes"], shape)
        cache = os.path.join(folder, "cache")
        run_cases(spec, [(name, lambda budget, n=name: pipeline_case(n, paths, cache, spec, budget))
                         for name in spec["recipes"]])


def pipeline_case(name: str, paths, cache: str, spec: dict, budget: float) -> dict:
    from arssr_jax.data import make_train_iterator
    from arssr_jax.training import make_task

    config = recipe(name, "float32", False)  # the recipe's own batch and K, even in the smoke run
    data = dataclasses.replace(config.data, paths=tuple(paths), cache_dir=cache, worker_count=spec["workers"])
    iterator, convert_s = timed(make_train_iterator, data, paths, make_example=make_task(config).make_example,
                                process_index=0, process_count=1)
    try:
        _, first = timed(next, iterator)
        warm_until = time.perf_counter() + budget / 3
        while time.perf_counter() < warm_until:  # drain what the workers buffered during start-up
            next(iterator)
        batches, t0 = 0, time.perf_counter()
        while batches < 2 or time.perf_counter() - t0 < budget:
            next(iterator)
            batches += 1
        seconds = time.perf_counter() - t0
    finally:
        iterator.close()
    row = {"recipe": name, "workers": spec["workers"], "volumes": len(paths),
           "volume_shape": list(spec["volume_shape"]),
           "batch": data.batch_size, "samples_per_step_K": data.samples_per_step,
           "cache_and_start_s": round(convert_s, 3), "first_batch_s": round(first, 3), "timed_batches": batches,
           "samples_per_s": round(batches * data.batch_size / seconds, 1)}
    row["summary"] = (f"{row['samples_per_s']:.4g} samples/s with {row['workers']} worker(s) (batch {data.batch_size},"
                      f" K {data.samples_per_step}); first batch {first:.2f} s")
    return row


# -- the decoder's chunk size


def chunk_part(spec: dict) -> None:
    run_cases(spec, [(f"{which} bfloat16 x2", lambda budget, w=which: chunk_case(w, spec, budget))
                     for which in spec["chunk_models"]])


def chunk_case(which: str, spec: dict, budget: float) -> dict:
    from arssr_jax.coords import grid_for_scale
    from arssr_jax.inference import decode_grid, default_chunk, encode_volume

    volume = lr_volume(spec["lr_shape"])
    module, params = inference_model(which, "bfloat16", spec["smoke"])
    grid = grid_for_scale(volume.shape, 2.0)
    features = encode_volume(module, params, volume)
    seconds = {}
    for chunk in spec["chunks"]:
        _, cold = timed(decode_grid, module, params, features, grid, chunk=chunk)
        seconds[str(chunk)] = round(best_time(lambda c=chunk: decode_grid(module, params, features, grid, chunk=c), 2,
                                              budget / len(spec["chunks"])), 4)
    best = min(seconds, key=seconds.get)
    row = {"model": which, "dtype": "bfloat16", "scale": 2.0, "hr_voxels": int(grid.num_voxels),
           "decode_s_by_chunk": seconds, "best_chunk": int(best), "default_chunk": default_chunk()}
    row["summary"] = (f"best chunk {best} voxels ({seconds[best]:.3f} s); default {row['default_chunk']}; "
                      + ", ".join(f"{c}: {s:.3f} s" for c, s in seconds.items()))
    return row


CHILDREN = {"environment": environment, "inference shipped": inference_part, "inference paper": inference_part,
            "training paper": training_part, "training shipped": training_part, "torch reference": torch_part,
            "input pipeline": pipeline_part, "chunk sweep": chunk_part}


if __name__ == "__main__":
    sys.exit(main())
