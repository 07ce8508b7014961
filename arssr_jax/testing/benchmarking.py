"""Helpers the benchmarks in eval/ share: timers, a process-tree memory sampler, synthetic
volumes, matmul rates and the peak FLOP rates of the chips they run on.

Importing this module imports numpy only (JAX, torch, scipy and nibabel where used).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

# -- timing ---------------------------------------------------------------------------------


def timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), seconds of wall time)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def best_time(fn, repeats: int = 3, budget_s: float = float("inf")) -> float:
    """The fastest of up to ``repeats`` calls of ``fn()`` (at least one), stopping once
    ``budget_s`` seconds have been spent."""
    best, spent = float("inf"), 0.0
    for _ in range(max(1, repeats)):
        _, seconds = timed(fn)
        best, spent = min(best, seconds), spent + seconds
        if spent >= budget_s:
            break
    return best


def one_line_error(error: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


# -- peak FLOP rates --------------------------------------------------------------------------

# Dense peak FLOP/s per chip (NVIDIA data sheets). "float32" is the TF32 tensor-core rate,
# which float32 matrix products and convolutions use on these GPUs at JAX's default precision
# (and in PyTorch's cuDNN convolutions by default); "fp32" is the plain CUDA-core rate.
CHIP_PEAKS = {
    "H100 SXM": {"bfloat16": 989e12, "float32": 495e12, "fp32": 67e12},
    "H100 PCIe": {"bfloat16": 756e12, "float32": 378e12, "fp32": 51e12},
    "H100 NVL": {"bfloat16": 835e12, "float32": 418e12, "fp32": 60e12},
    "H200": {"bfloat16": 989e12, "float32": 495e12, "fp32": 67e12},
}


def chip_name(device_kind: str) -> str | None:
    """The CHIP_PEAKS entry of a JAX ``device_kind`` (e.g. "NVIDIA H100 80GB HBM3"), or None."""
    kind = device_kind.upper()
    if "H200" in kind:
        return "H200"
    if "H100" in kind:
        if "PCIE" in kind:
            return "H100 PCIe"
        return "H100 NVL" if "NVL" in kind else "H100 SXM"
    return None


def chip_peak(device_kind: str, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s or None, which peak that is, in words) for ``dtype`` on a device kind."""
    chip = chip_name(device_kind)
    if chip is None:
        return None, f"no peak known for device {device_kind!r} (known: {', '.join(CHIP_PEAKS)})"
    rate = CHIP_PEAKS[chip][dtype]
    unit = "BF16 tensor cores" if dtype == "bfloat16" else "TF32 tensor cores (float32 at default precision)"
    return rate, f"{chip} {unit}, dense: {rate / 1e12:.0f} TFLOP/s"


# -- matmul rates --------------------------------------------------------------------------------


def jax_matmul_gflops(m=262144, k=256, n=256, repeats=3) -> float:
    """GFLOP/s of a float32 ``jnp.dot`` of (m, k) by (k, n), best of ``repeats``."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k), np.float32))
    b = jnp.asarray(rng.standard_normal((k, n), np.float32))
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    return 2 * m * k * n / best_time(lambda: dot(a, b).block_until_ready(), repeats) / 1e9


def torch_matmul_gflops(m=262144, k=256, n=256, repeats=3) -> float | None:
    """The same for ``torch.matmul`` on all CPU threads; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count())
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.matmul(a, b)
    return 2 * m * k * n / best_time(lambda: torch.matmul(a, b), repeats) / 1e9


# -- process-tree memory and CPU ----------------------------------------------------------------


def _children_map() -> dict:
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(name))
    return children


def process_tree(pid: int) -> list:
    """``pid`` and all its descendants."""
    children, tree, todo = _children_map(), [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def _status_kb(pid: int, fields) -> dict:
    out = dict.fromkeys(fields, 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in out:
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def tree_memory(pid: int) -> dict:
    """RssAnon, RssShmem and RssFile (bytes) summed over ``pid`` and its descendants."""
    total = {"RssAnon": 0, "RssShmem": 0, "RssFile": 0, "processes": 0}
    for p in process_tree(pid):
        for key, kb in _status_kb(p, ("RssAnon", "RssShmem", "RssFile")).items():
            total[key] += 1024 * kb
        total["processes"] += 1
    return total


def tree_cpu_seconds(pid: int) -> np.ndarray:
    """(user, system) CPU seconds of ``pid`` and its live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total = np.zeros(2)
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += [int(fields[11]), int(fields[12])]
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


class MemorySampler(threading.Thread):
    """Samples ``tree_memory(pid)`` every ``period`` seconds until stopped."""

    def __init__(self, pid: int, period: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.period, self.samples = pid, period, []
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            self.samples.append((time.time(), tree_memory(self.pid)))
            self._stop_event.wait(self.period)

    def stop(self):
        self._stop_event.set()
        self.join()

    def steady(self, start: float, end: float) -> float:
        """Median RssAnon over [start, end]: the level between transients."""
        inside = [m["RssAnon"] for t, m in self.samples if start <= t <= end]
        return float(np.median(inside)) if inside else float("nan")

    def peak(self, start: float = -np.inf, end: float = np.inf) -> dict:
        inside = [m for t, m in self.samples if start <= t <= end]
        if not inside:
            return {}
        best = max(inside, key=lambda m: m["RssAnon"])
        return {"RssAnon": best["RssAnon"], "RssShmem": max(m["RssShmem"] for m in inside),
                "RssFile": max(m["RssFile"] for m in inside),
                "processes": max(m["processes"] for m in inside)}


# -- synthetic volumes ---------------------------------------------------------------------------


def synthetic_volume(shape, seed: int = 0) -> np.ndarray:
    """A head-like volume: a noisy ellipsoid of tissue in a dark, noisy background (float32)."""
    rng = np.random.default_rng(seed)
    axes = [((np.arange(n, dtype=np.float32) - (n - 1) / 2) / (0.42 * n)) ** 2 for n in shape]
    r2 = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
    volume = rng.random(shape, dtype=np.float32)
    volume *= 0.1
    volume += np.where(r2 < 1.0, np.float32(0.5 + 0.3 * rng.random()), np.float32(0.0))
    volume *= np.float32(800.0)
    return volume


def realistic_volume(shape) -> np.ndarray:
    """A crop of the MNI152 T1 template resampled to 2 mm (real anatomy; nilearn), else smooth
    noise; scaled to [0, 1]."""
    from scipy import ndimage

    try:
        from nilearn.datasets import load_mni152_template

        t1 = np.asarray(load_mni152_template(resolution=1).get_fdata(), np.float32)
        lr = ndimage.zoom(t1, 0.5, order=3, grid_mode=True, mode="grid-constant")
        if any(s > n for s, n in zip(shape, lr.shape)):
            lr = ndimage.zoom(t1, [s / n for s, n in zip(shape, t1.shape)], order=1)
        starts = [(n - s) // 2 for n, s in zip(lr.shape, shape)]
        crop = lr[tuple(slice(a, a + s) for a, s in zip(starts, shape))]
    except ImportError:
        crop = ndimage.gaussian_filter(np.random.default_rng(0).random(shape), 2).astype(np.float32)
    crop = crop - crop.min()
    return (crop / crop.max()).astype(np.float32)


def write_volumes(folder: str, count: int, shape, quiet: bool = True) -> list:
    """``count`` synthetic volumes as uncompressed float32 NIfTI files (existing ones kept)."""
    import nibabel as nib

    from arssr_jax.progress import progress_bar

    os.makedirs(folder, exist_ok=True)
    paths = []
    affine = np.diag([0.7, 0.7, 0.7, 1.0])
    for i in progress_bar(range(count), desc="synthetic volumes", unit="vol", enabled=not quiet):
        path = os.path.join(folder, f"vol_{i:04d}.nii")
        if not os.path.isfile(path):
            image = nib.Nifti1Image(synthetic_volume(shape, i), affine)
            image.header.set_data_dtype(np.float32)
            nib.save(image, path)
        paths.append(path)
    return paths
