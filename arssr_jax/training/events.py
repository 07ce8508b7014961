"""TensorBoard event files beside ``log.jsonl`` (optional: written when ``tensorboardX`` imports).

``pip install "arssr-jax[tensorboard]"`` (or ``pip install tensorboardX``) turns them on; view
them with ``tensorboard --logdir runs/`` (one run per workdir). The main process writes them.

Tags: ``train/loss`` (mean over each log interval), ``train/lr``, ``train/grad_norm``,
``train/samples_per_s``; at each validation ``val/l1``, ``val/psnr``, ``val/psnr_x<s>`` and the
same for the interpolation of the LR patch (``interpolation/...``, the bar to clear), with a
custom-scalars layout that draws each scale's PSNR over its interpolation bar.

A resumed run writes a new event file that starts with a purge at its first step, so
TensorBoard drops what an interrupted run logged past its last checkpoint.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from arssr_jax.curves import scale_key

INSTALL_HINT = 'pip install "arssr-jax[tensorboard]" (tensorboardX) to get them'


class EventLog:
    """Scalars into TensorBoard event files in ``workdir``; does nothing without tensorboardX.

    ``message`` says where the files go, or why there are none.
    """

    def __init__(self, workdir, start_step: int = 0):
        self.workdir = Path(workdir)
        self.start_step = int(start_step)
        self._writer = None
        self._writer_class = None
        self._layout_written = False
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            self.message = f"no TensorBoard event files: tensorboardX is not installed; {INSTALL_HINT}"
            return
        except Exception as error:  # e.g. a protobuf it cannot work with
            self.message = f"no TensorBoard event files: tensorboardX failed to import ({type(error).__name__}: {error})"
            return
        self._writer_class = SummaryWriter
        self.message = f"TensorBoard event files in {self.workdir} (tensorboard --logdir {self.workdir.parent})"

    @property
    def enabled(self) -> bool:
        return self._writer_class is not None

    def _open(self) -> bool:
        """The event file, made at the first scalar (a run with nothing to do leaves none)."""
        if self._writer is None and self._writer_class is not None:
            # tensorboardX names files by the second: a nanosecond and pid suffix keeps two runs
            # started within one second apart, in the order they started
            suffix = f".{time.time_ns() % 10**9:09d}.{os.getpid()}"
            try:
                self._writer = self._writer_class(logdir=str(self.workdir), purge_step=self.start_step,
                                                  flush_secs=30, filename_suffix=suffix)
            except OSError:
                self._writer_class = None  # no space, no permission: the run goes on without them
        return self._writer is not None

    def scalars(self, step: int, values: dict) -> None:
        """Write every finite number of ``values`` ({tag: value}) at ``step``."""
        if not self._open():
            return
        for tag, value in values.items():
            if value is None:
                continue
            value = float(value)
            if math.isfinite(value):
                self._writer.add_scalar(tag, value, global_step=int(step))

    def validation(self, step: int, metrics: dict, interpolation: dict, interpolation_name: str) -> None:
        """One validation's metrics and, at the same step, the interpolation bar."""
        if not self._open():
            return
        by_scale = metrics.get("val_psnr_by_scale", {}) or {}
        bar_by_scale = interpolation.get("val_psnr_by_scale", {}) or {}
        if not self._layout_written:
            self._write_layout(sorted(set(by_scale) | set(bar_by_scale), key=scale_key), interpolation_name)
        values = {"val/l1": metrics.get("val_l1"), "val/psnr": metrics.get("val_psnr"),
                  "interpolation/l1": interpolation.get("val_l1"), "interpolation/psnr": interpolation.get("val_psnr")}
        values.update({f"val/psnr_x{s}": v for s, v in by_scale.items()})
        values.update({f"interpolation/psnr_x{s}": v for s, v in bar_by_scale.items()})
        self.scalars(step, values)
        self._writer.flush()

    def _write_layout(self, scales, interpolation_name: str) -> None:
        charts = {"mean": ["Multiline", ["val/psnr", "interpolation/psnr"]]}
        charts.update({f"x{s}": ["Multiline", [f"val/psnr_x{s}", f"interpolation/psnr_x{s}"]] for s in scales})
        self._writer.add_custom_scalars({f"validation PSNR vs {interpolation_name} interpolation": charts})
        self._layout_written = True

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_scalars(workdir) -> dict:
    """{tag: [(step, value), ...]} from every event file in ``workdir``, in file order (for
    tests and quick looks; needs tensorboardX's protobuf messages, not TensorBoard)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    found: dict = {}
    for path in sorted(Path(workdir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            record = data[at + 12:at + 12 + length]  # after the length and its CRC
            if len(record) < length:
                break  # a record still being written
            at += 12 + length + 4
            event = Event.FromString(record)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    found.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return found


__all__ = ["EventLog", "read_scalars", "INSTALL_HINT"]
