#!/usr/bin/env python
"""Run ECLARE, the peer method for thick-slice MRI super-resolution, on one NIfTI.

ECLARE (``pip install eclare``, PyTorch) trains a 2D network on the scan's own in-plane
slices and applies it through-plane. The project never imports torch: ECLARE runs as a
subprocess in its own virtual environment, installed with the CPU build of torch::

    python3 -m venv /work/main/.eclare-venv
    /work/main/.eclare-venv/bin/pip install torch==2.13.0
    /work/main/.eclare-venv/bin/pip install eclare==1.0.1 torch==2.13.0

(eclare 1.0.1 needs torch>=2.5, scipy==1.11.4, radifox-utils==1.0.3; naming torch==2.13.0
again keeps pip from replacing the CPU build.)

Usage::

    python eval/run_eclare.py THICK.nii.gz --out-dir DIR --patches 3000 \
        --slice-thickness 4 --profile box --like SOURCE_1MM.nii.gz

writes ``DIR/<stem>_eclare.nii.gz`` (``<stem>`` = the input's name without ``.nii[.gz]``,
or ``--name``), ``DIR/<stem>_eclare.json`` (patch budget, wall time, ECLARE and torch
versions, the exact command, the output grid) and ``DIR/<stem>_eclare.log`` (ECLARE's
output). For the thick-slice protocol name the inputs ``<source>_x<factor>_<profile>`` so
that the outputs read ``<source>_x<factor>_<profile>_eclare.nii.gz``.

ECLARE's options, as mapped here (eclare 1.0.1, ``run-eclare`` = ``eclare.main:main``):

* ``--patches N`` -> ``--n-patches N`` (its default 1,000,000; training steps =
  ceil(N / batch size), ``--batch-size`` default 128). On a 2-core CPU it trains ~15-20
  patches/s, so a CPU run needs a reduced budget: the JSON records it.
* ``--slice-thickness MM`` -> ``--relative-slice-thickness MM / min(in-plane spacing)``
  (ECLARE takes it in in-plane voxels); default: the slice spacing.
* ``--profile box|gaussian`` -> ``--relative-slice-profile-type boxcar|gaussian`` (box of
  width = thickness; Gaussian of FWHM = thickness). ``--profile estimate`` passes no
  thickness, and ECLARE first estimates the slice profile itself (ESPRESO, extra time).
* ``--device cpu|cuda[:N]`` -> ``--gpu-id -1|N``.
* ``--threads N`` sets OMP/MKL threads; ECLARE's DataLoader also uses that many workers.

Output grid (read from eclare 1.0.1's source and checked on an example, ``--selftest``
checks the placement code): the thick axis is the one with the largest spacing; with
``n`` slices and separation ``s = spacing / min(in-plane spacing)`` the output has
``round(n * s)`` slices of spacing ``spacing / s`` spanning the same field of view
(radifox ``resize`` with ``same_fov``; the affine comes from radifox ``update_affine``):
the first output slice sits at (LR slice 0's centre) - (spacing - spacing / s) / 2, i.e.
at the left edge of the thick slab + half an HR slice. In-plane shape and affine are
unchanged. So an LR made from a 1 mm source by averaging blocks of ``f`` slices starting
at slice ``k0`` (LR origin at the block centre) comes back on the source's own grid,
slices ``k0 .. k0 + f*m - 1``: an integer index offset, no resampling. ``--like SOURCE``
places the output on SOURCE's grid by that offset (slices outside the covered range are
filled with the nearest covered slice and listed in the JSON as ``grid.covered``; score
only those, or accept the fill); only when the relation is not an integer offset (for
example a non-integer separation, where ECLARE centres its output but its affine assumes
an exact fit) is it resampled (trilinear) and the JSON says so.

``--demo DIR`` makes nibabel's ``anatomical.nii`` (2 mm) thick (blocks of 4 slices
averaged along the last axis), runs ECLARE on it and prints PSNR against the source
beside a cubic interpolation along the slice axis.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_VENV = "/work/main/.eclare-venv"
INSTALL = (
    "python3 -m venv {v} && {v}/bin/pip install torch==2.13.0 && "
    "{v}/bin/pip install eclare==1.0.1 torch==2.13.0"
)
PROFILES = {"box": "boxcar", "gaussian": "gaussian", "estimate": None}


def fail(msg: str, code: int = 2):
    print(f"run_eclare: error: {msg}", file=sys.stderr)
    sys.exit(code)


def stem_of(path: str | Path) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


# --------------------------------------------------------------------------- grid


def eclare_grid(shape, affine, zooms):
    """The shape and affine that eclare 1.0.1 writes for an input of this grid."""
    zooms = np.asarray(zooms, float)
    lr_axis = int(np.argmax(zooms))
    inplane = min(z for i, z in enumerate(zooms) if i != lr_axis)
    sep = round(float(zooms[lr_axis] / inplane), 3)
    shape = list(shape)
    shape[lr_axis] = int(round(shape[lr_axis] * sep))
    # radifox update_affine with scales[lr_axis] = 1 / sep: the same rotation and shears,
    # zoom / sep, and the origin moved back by (spacing - spacing / sep) / 2.
    aff = np.array(affine, float)
    col = aff[:3, lr_axis].copy()
    aff[:3, lr_axis] = col / sep
    aff[:3, 3] -= col / 2 * (1 - 1 / sep)
    return tuple(shape), aff, lr_axis, sep


def place_on_grid(data, affine, ref_shape, ref_affine, tol=1e-3):
    """Put ``data`` (on ``affine``) onto the grid (ref_shape, ref_affine).

    Returns (array, info). When inv(ref_affine) @ affine is the identity up to an integer
    index offset, the array is cropped/placed by index (no interpolation): voxels of the
    reference grid outside ``data`` get the nearest covered voxel, and info["covered"]
    holds the [start, stop) index range per axis. Otherwise it is resampled trilinearly
    (info["relation"] = "resampled").
    """
    t = np.linalg.inv(np.asarray(ref_affine, float)) @ np.asarray(affine, float)
    lin, off = t[:3, :3], t[:3, 3]
    if np.allclose(lin, np.eye(3), atol=tol) and np.allclose(off, np.round(off), atol=tol):
        off = np.round(off).astype(int)
        out = np.empty(ref_shape, np.float32)
        covered, src_idx = [], []
        for ax in range(3):
            lo = max(0, off[ax])
            hi = min(ref_shape[ax], off[ax] + data.shape[ax])
            if hi <= lo:
                raise ValueError("output and reference grids do not overlap")
            covered.append([int(lo), int(hi)])
            # index into data for every reference index: clip to the covered range
            # (nearest covered voxel outside it)
            src_idx.append(np.clip(np.arange(ref_shape[ax]), lo, hi - 1) - off[ax])
        out[...] = data[np.ix_(*src_idx)]
        relation = "identical" if (not off.any() and tuple(data.shape) == tuple(ref_shape)) else "index_offset"
        return out, {"relation": relation, "offset_vox": off.tolist(), "covered": covered}
    from scipy.ndimage import map_coordinates

    inv = np.linalg.inv(np.asarray(affine, float)) @ np.asarray(ref_affine, float)
    idx = np.indices(ref_shape, dtype=np.float32).reshape(3, -1)
    coords = inv[:3, :3] @ idx + inv[:3, 3:4]
    out = map_coordinates(np.asarray(data, np.float32), coords, order=1, mode="nearest")
    return out.reshape(ref_shape).astype(np.float32), {
        "relation": "resampled",
        "method": "trilinear (scipy map_coordinates order=1, mode=nearest)",
        "ref_from_output": t.round(6).tolist(),
        "covered": None,
    }


# --------------------------------------------------------------------------- venv


def check_venv(venv: Path):
    exe = venv / "bin" / "run-eclare"
    py = venv / "bin" / "python"
    if not exe.exists() or not py.exists():
        fail(f"no ECLARE in {venv} (missing {exe.name}); install it with: {INSTALL.format(v=venv)}")
    q = (
        "import importlib.metadata as m; "
        "print(m.version('eclare'), m.version('torch'))"
    )
    try:
        r = subprocess.run([str(py), "-c", q], capture_output=True, text=True, timeout=120)
        eclare_v, torch_v = r.stdout.split()
    except Exception:
        fail(f"ECLARE in {venv} is broken; reinstall it with: {INSTALL.format(v=venv)}")
    return exe, eclare_v, torch_v


# --------------------------------------------------------------------------- run


def run(args) -> dict:
    import nibabel as nib

    venv = Path(args.venv)
    exe, eclare_v, torch_v = check_venv(venv)
    if args.patches < 1:
        fail("--patches must be >= 1")
    if args.slice_thickness is not None and not args.slice_thickness > 0:
        fail("--slice-thickness must be > 0")
    in_path = Path(args.input)
    if not in_path.exists():
        fail(f"no such file: {in_path}")
    img = nib.load(str(in_path))
    if len(img.shape) != 3:
        fail(f"{in_path}: expected a 3D volume, got shape {img.shape}")
    zooms = np.array(img.header.get_zooms()[:3], float)
    lr_axis = int(np.argmax(zooms))
    inplane = [z for i, z in enumerate(zooms) if i != lr_axis]
    if np.any(np.isclose(zooms[lr_axis], inplane, rtol=1e-3)):
        fail(f"{in_path}: spacing {zooms.tolist()} has no single thick axis; ECLARE needs one")
    exp_shape, exp_aff, _, sep = eclare_grid(img.shape, img.affine, zooms)
    thickness = args.slice_thickness if args.slice_thickness is not None else float(zooms[lr_axis])
    rel = thickness / min(inplane)
    ptype = PROFILES[args.profile]

    stem = args.name or stem_of(in_path)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"{stem}_eclare.nii.gz"
    json_path = out_dir / f"{stem}_eclare.json"
    log_path = out_dir / f"{stem}_eclare.log"

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    work = Path(tempfile.mkdtemp(prefix=f".eclare-{stem}-", dir=out_dir))
    proc = None

    def cleanup(*_):
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
            except Exception:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except Exception:
                    pass
        shutil.rmtree(work, ignore_errors=True)

    try:
        # a float32 copy named <stem>.nii.gz: ECLARE saves with the input's header, so an
        # integer input would come back quantized; the name fixes ECLARE's output name.
        work_in = work / f"{stem}.nii.gz"
        hdr = img.header.copy()
        hdr.set_data_dtype(np.float32)
        nib.save(nib.Nifti1Image(img.get_fdata(dtype=np.float32), img.affine, hdr), str(work_in))
        cmd = [
            str(exe),
            "--in-fpath", str(work_in),
            "--out-dir", str(work / "out"),
            "--n-patches", str(args.patches),
            "--batch-size", str(args.batch_size),
            "--suffix", "_eclare",
            "--gpu-id", str(args.gpu_id),
        ]
        if ptype is not None:
            cmd += ["--relative-slice-thickness", f"{rel:.6g}", "--relative-slice-profile-type", ptype]
        env = dict(os.environ)
        if args.threads:
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                env[k] = str(args.threads)
        env.setdefault("PYTHONUNBUFFERED", "1")
        print(f"run_eclare: {shlex.join(cmd)}", flush=True)
        t0 = time.time()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            while True:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                log.write(chunk)
                if not args.quiet:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            rc = proc.wait()
        wall = time.time() - t0
        if rc != 0:
            fail(f"ECLARE exited with {rc}; see {log_path}", 1)
        raw_path = work / "out" / f"{stem}_eclare.nii.gz"
        if not raw_path.exists():
            fail(f"ECLARE wrote no {raw_path.name}; see {log_path}", 1)
        eclare_s, on_cpu = None, False
        for line in log_path.read_text(errors="replace").splitlines():
            if "ECLARE elapsed time:" in line:
                eclare_s = float(line.split(":")[1].strip().rstrip("s"))
            on_cpu |= "Running on CPU" in line  # ECLARE falls back to the CPU silently
        raw = nib.load(str(raw_path))
        data = raw.get_fdata(dtype=np.float32)
        grid = {
            "eclare_shape": list(raw.shape),
            "eclare_affine": np.round(raw.affine, 6).tolist(),
            "input_shape": list(img.shape),
            "thick_axis": lr_axis,
            "separation": sep,
            "matches_expected": bool(tuple(raw.shape) == exp_shape and np.allclose(raw.affine, exp_aff, atol=1e-3)),
        }
        if args.like:
            ref = nib.load(args.like)
            placed, info = place_on_grid(data, raw.affine, ref.shape[:3], ref.affine)
            grid.update({"like": str(args.like), "like_shape": list(ref.shape[:3])}, **info)
            hdr = ref.header.copy()
            hdr.set_data_dtype(np.float32)
            final = nib.Nifti1Image(placed, ref.affine, hdr)
            if info["relation"] == "resampled":
                shutil.copy(raw_path, out_dir / f"{stem}_eclare_raw.nii.gz")
                grid["raw"] = str(out_dir / f"{stem}_eclare_raw.nii.gz")
        else:
            hdr = raw.header.copy()
            hdr.set_data_dtype(np.float32)
            final = nib.Nifti1Image(data, raw.affine, hdr)
        tmp = out_path.with_name(out_path.name + ".tmp.nii.gz")
        nib.save(final, str(tmp))
        os.replace(tmp, out_path)
        rec = {
            "input": str(in_path),
            "output": str(out_path),
            "eclare_version": eclare_v,
            "torch_version": torch_v,
            "n_patches": args.patches,
            "batch_size": args.batch_size,
            "n_steps": -(-args.patches // args.batch_size),
            "eclare_default_n_patches": 1000000,
            "profile": args.profile,
            "slice_thickness_mm": None if ptype is None else thickness,
            "relative_slice_thickness": None if ptype is None else float(f"{rel:.6g}"),
            "device": "cpu" if args.gpu_id < 0 or on_cpu else f"cuda:{args.gpu_id}",
            "threads": args.threads,
            "wall_s": round(wall, 2),
            "eclare_reported_s": eclare_s,
            "command": shlex.join(cmd),
            "argv": [sys.executable, *sys.argv],
            "grid": grid,
        }
        json_path.write_text(json.dumps(rec, indent=2) + "\n")
        print(f"run_eclare: wrote {out_path} ({wall:.1f} s, {args.patches} patches); {json_path}")
        return rec
    except KeyboardInterrupt:
        cleanup()
        out_path.with_name(out_path.name + ".tmp.nii.gz").unlink(missing_ok=True)
        log_path.unlink(missing_ok=True)
        print("run_eclare: interrupted; nothing written", file=sys.stderr)
        sys.exit(130)
    finally:
        cleanup()


# --------------------------------------------------------------------------- demo


def make_thick(data, affine, factor, axis=2, start=0):
    """Average blocks of ``factor`` slices (box profile) along ``axis`` from ``start``;
    the remainder at the end is dropped. The affine's slice spacing grows by ``factor``
    and the origin moves to the centre of the first block."""
    m = (data.shape[axis] - start) // factor
    d = np.moveaxis(data, axis, -1)[..., start : start + m * factor]
    lr = d.reshape(*d.shape[:-1], m, factor).mean(-1)
    lr = np.moveaxis(lr, -1, axis).astype(np.float32)
    aff = np.array(affine, float)
    col = aff[:3, axis].copy()
    aff[:3, 3] += col * (start + (factor - 1) / 2)
    aff[:3, axis] = col * factor
    return lr, aff


def cubic_along(lr, factor, n_hr, axis=2, start=0):
    """Cubic B-spline interpolation of ``lr`` along ``axis`` onto the HR slice centres
    0..n_hr-1 (LR slice j sits at HR coordinate start + j*factor + (factor-1)/2)."""
    from scipy.ndimage import map_coordinates

    lr = np.moveaxis(lr, axis, -1)
    k = np.arange(n_hr)
    zc = (k - start - (factor - 1) / 2) / factor
    grids = np.meshgrid(*[np.arange(s) for s in lr.shape[:-1]], zc, indexing="ij")
    out = map_coordinates(lr.astype(np.float64), grids, order=3, mode="nearest")
    return np.moveaxis(out, -1, axis).astype(np.float32)


def psnr(x, ref, rng):
    return float(20 * np.log10(rng / np.sqrt(np.mean((np.asarray(x, float) - ref) ** 2))))


def demo(args):
    import nibabel as nib

    src_path = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    src = nib.load(str(src_path))
    hr = src.get_fdata(dtype=np.float32)
    f = args.factor
    out_dir = Path(args.demo)
    out_dir.mkdir(parents=True, exist_ok=True)
    lr, lr_aff = make_thick(hr, src.affine, f)
    hdr = src.header.copy()
    hdr.set_data_dtype(np.float32)
    lr_path = out_dir / f"anatomical_x{f}_box.nii.gz"
    nib.save(nib.Nifti1Image(lr, lr_aff, hdr), str(lr_path))
    nib.save(nib.Nifti1Image(hr, src.affine, hdr), str(out_dir / "anatomical.nii.gz"))
    args.input = str(lr_path)
    args.out_dir = str(out_dir)
    args.like = str(out_dir / "anatomical.nii.gz")
    args.profile = "box"
    args.slice_thickness = None
    rec = run(args)
    sr = nib.load(rec["output"]).get_fdata(dtype=np.float32)
    n = lr.shape[2] * f
    cub = cubic_along(lr, f, hr.shape[2])
    rng = float(hr.max() - hr.min())
    res = {
        "slices_scored": [0, n],
        "psnr_eclare": psnr(sr[..., :n], hr[..., :n], rng),
        "psnr_cubic": psnr(cub[..., :n], hr[..., :n], rng),
        "psnr_eclare_inner": psnr(sr[..., f:n - f], hr[..., f:n - f], rng),
        "psnr_cubic_inner": psnr(cub[..., f:n - f], hr[..., f:n - f], rng),
    }
    rec["demo"] = res
    Path(args.out_dir, stem_of(lr_path) + "_eclare.json").write_text(json.dumps(rec, indent=2) + "\n")
    print(json.dumps(res, indent=2))


def selftest():
    """Grid placement on small synthetic volumes (no ECLARE needed)."""
    rng = np.random.default_rng(0)
    hr = rng.random((6, 7, 19)).astype(np.float32)
    aff = np.array([[-2, 0, 0, 30], [0, 2, 0, -40], [0, 0, 2, -16], [0, 0, 0, 1.0]])
    for f, start in ((4, 0), (4, 1), (3, 2), (5, 0)):
        lr, lr_aff = make_thick(hr, aff, f, start=start)
        zooms = np.sqrt((lr_aff[:3, :3] ** 2).sum(0))
        shp, e_aff, ax, sep = eclare_grid(lr.shape, lr_aff, zooms)
        assert ax == 2 and sep == f and shp[2] == lr.shape[2] * f, (shp, sep)
        # an ECLARE-like output: the HR slices it covers
        m = lr.shape[2]
        fake = hr[..., start : start + m * f]
        placed, info = place_on_grid(fake, e_aff, hr.shape, aff)
        assert info["relation"] in ("identical", "index_offset"), info
        assert info["covered"][2] == [start, start + m * f], info
        assert np.array_equal(placed[..., start : start + m * f], fake)
        assert np.array_equal(placed[..., :start], np.repeat(fake[..., :1], start, 2))
    # identical grid
    placed, info = place_on_grid(hr, aff, hr.shape, aff)
    assert info["relation"] == "identical" and np.array_equal(placed, hr)
    # a half-voxel shift is resampled, not cropped
    a2 = aff.copy()
    a2[2, 3] += 1.0
    _, info = place_on_grid(hr, a2, hr.shape, aff)
    assert info["relation"] == "resampled", info
    # cubic_along interpolates: at the LR slice centres (HR k = 1, 4, 7, ... for x3) it
    # returns the LR values
    lr, _ = make_thick(hr, aff, 3)
    cub = cubic_along(lr, 3, 19)
    assert np.allclose(cub[..., 1:18:3], lr, atol=1e-5)
    print("run_eclare selftest: ok")


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Run ECLARE (its own venv, as a subprocess) on one thick-slice NIfTI.",
        epilog="Install: " + INSTALL.format(v=DEFAULT_VENV),
    )
    p.add_argument("input", nargs="?", help="thick-slice NIfTI (the thick axis: largest spacing)")
    p.add_argument("--out-dir", help="writes <stem>_eclare.nii.gz, .json and .log there")
    p.add_argument("--name", help="output stem (default: the input's name without .nii[.gz])")
    p.add_argument("--patches", type=int, default=20000, help="training patch budget (ECLARE's default 1000000; default here 20000)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--slice-thickness", type=float, default=None, metavar="MM", help="slice thickness in mm (default: the slice spacing)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="box", help="slice profile: box (width = thickness), gaussian (FWHM = thickness), estimate (ECLARE's ESPRESO)")
    p.add_argument("--like", metavar="REF", help="place the output on REF's grid (the HR source) by index offset, or resample if needed")
    p.add_argument("--venv", default=DEFAULT_VENV)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch/OMP threads (and DataLoader workers)")
    p.add_argument("--quiet", action="store_true", help="ECLARE's output only to the log")
    p.add_argument("--demo", metavar="DIR", help="thick anatomical.nii (x --factor, box) -> ECLARE -> PSNR vs cubic")
    p.add_argument("--factor", type=int, default=4, help="--demo's slice factor")
    p.add_argument("--selftest", action="store_true", help="check the grid placement code and exit")
    args = p.parse_args(argv)
    dev = args.device
    if dev == "cpu":
        args.gpu_id = -1
    elif dev.startswith("cuda"):
        args.gpu_id = int(dev.split(":")[1]) if ":" in dev else 0
    else:
        fail(f"--device {dev}: expected cpu or cuda[:N]")
    if args.selftest:
        selftest()
        return 0
    if args.demo:
        demo(args)
        return 0
    if not args.input or not args.out_dir:
        fail("give INPUT and --out-dir (or --demo DIR, or --selftest)")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
