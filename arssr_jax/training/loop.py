"""The training loop: data -> pmapped train_step -> log, validate, checkpoint.

``train(config, workdir)`` starts a run, or resumes it from the workdir's latest
checkpoint (same model, optimiser, PRNG key and data position: the resumed run takes
exactly the steps the uninterrupted one would have). Validation and checkpointing
happen together every ``config.eval_every_steps`` steps and at the end.

Workdir layout::

    WORKDIR/train_config.json the run's full TrainConfig (JSON)
    WORKDIR/log.jsonl        one JSON record per log interval / validation
    WORKDIR/events.out.tfevents.*  the same scalars for TensorBoard (with tensorboardX; ``events``)
    WORKDIR/curves.png       loss, learning rate, validation PSNR per scale (``arssr_jax.curves``)
    WORKDIR/checkpoints/     orbax checkpoints (see ``checkpoints``)

Only the main process (process 0) writes these files; every process reads the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import jax

from arssr_jax.curves import LOG_FILE, PLOT_FILE
from arssr_jax.data import load_volumes, make_train_iterator, validation_samples
from arssr_jax.data.volumes import check_patch_fits
from arssr_jax.errors import ArSSRError
from arssr_jax.models import count_params
from arssr_jax.training import parallel
from arssr_jax.training.checkpoints import CheckpointStore
from arssr_jax.training.config import CONFIG_FILE, TrainConfig, config_differences, load_config, save_config
from arssr_jax.training.events import EventLog
from arssr_jax.training.lock import WorkdirLock
from arssr_jax.training.state import create_train_state, make_optimizer
from arssr_jax.training.step import make_train_step
from arssr_jax.training.tasks import make_task



@dataclasses.dataclass
class TrainResult:
    workdir: Path
    step: int                      # steps done (the state's step)
    total_steps: int
    steps_per_epoch: int
    best_step: Optional[int]
    validation: dict               # the last validation metrics
    interpolation: dict            # the same metrics for interpolation of the LR (the bar to clear)
    samples_per_s: Optional[float]  # mean training throughput after compilation


class RunLog:
    """``log.jsonl``, TensorBoard event files (main process only) and console lines (unless quiet)."""

    def __init__(self, workdir: Path, enabled: bool, quiet: bool, start_step: int = 0):
        self.enabled = enabled
        self.quiet = quiet or not enabled
        self.bar = None
        self.workdir = workdir
        self._file = open(workdir / LOG_FILE, "a") if enabled else None
        self.events = EventLog(workdir, start_step) if enabled else None

    def record(self, **values) -> None:
        if self._file is not None:
            self._file.write(json.dumps(values, sort_keys=True) + "\n")
            self._file.flush()

    def say(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def scalars(self, step: int, values: dict) -> None:
        if self.events is not None:
            self.events.scalars(step, values)

    def plot(self) -> None:
        """``WORKDIR/curves.png`` from the log (one line if it cannot be drawn; never fails the run)."""
        if not self.enabled:
            return
        try:
            from arssr_jax.curves import plot_curves

            path = plot_curves(self.workdir)
        except ImportError as error:
            self.say(f"no {PLOT_FILE}: {error.name or 'matplotlib'} is not installed")
        except (ArSSRError, OSError, ValueError, RuntimeError) as error:
            self.say(f"no {PLOT_FILE}: {error}")
        else:
            self.say(f"training curves: {path} (arssr-jax plot {self.workdir} redraws them)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._file is not None:
            self._file.close()
        if self.events is not None:
            self.events.close()


def _by_scale(metrics: dict) -> str:
    return ", ".join(f"x{k} {v:.2f}" for k, v in metrics.get("val_psnr_by_scale", {}).items())


def check_workdir(config: TrainConfig, workdir) -> Path:
    """Refuse, without writing anything, a workdir that cannot hold this run: a file, one
    holding a run with a different config, checkpoints without a config."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ArSSRError(f"--workdir {workdir} is a file; give a directory")
    saved_path = workdir / CONFIG_FILE
    if saved_path.is_file():
        saved = load_config(saved_path)
        diffs = config_differences(saved, config)
        if diffs and _has_checkpoints(workdir):
            raise ArSSRError(f"{workdir} holds a run with a different config ({', '.join(diffs[:4])}); "
                             f"resume it with --config {saved_path} or choose a new --workdir")
    elif _has_checkpoints(workdir):
        raise ArSSRError(f"{workdir} has checkpoints but no {CONFIG_FILE}; choose a new --workdir")
    parent = workdir.absolute().parent
    if not workdir.exists() and parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ArSSRError(f"cannot create --workdir {workdir}: {parent} is not writable; choose another folder")
    return workdir


def _has_checkpoints(workdir: Path) -> bool:
    """Whether any checkpoint step was written (a config alone, from a run that stopped
    before its first checkpoint, holds nothing to resume: a new config may replace it)."""
    folder = workdir / "checkpoints"
    if not folder.is_dir():
        return folder.exists()
    return any(p.name.isdigit() for p in folder.iterdir())


def prepare_workdir(config: TrainConfig, workdir, lock: bool = True):
    """Create the workdir, take its lock (main process) and save the config.

    Returns ``(workdir, lock)``; release the lock when the run ends. Refuses a workdir
    that holds a run with a different config, and one another run holds.
    """
    workdir = check_workdir(config, workdir)
    held = None
    if parallel.is_main_process():
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ArSSRError(f"cannot create --workdir {workdir} ({error.strerror})") from None
        if lock:
            held = WorkdirLock(workdir).acquire()
        try:
            check_workdir(config, workdir)  # again, now that no other run can change it
            save_config(config, workdir)
        except BaseException:
            if held is not None:
                held.release()
            raise
    return workdir, held


def build_validator(config: TrainConfig, task, train_volumes, val_volumes=None):
    source = val_volumes if val_volumes is not None else (config.val.paths or train_volumes)
    volumes = load_volumes(source, cache_dir=config.data.cache_dir)
    if config.val.max_volumes is not None:
        volumes = type(volumes)(volumes.arrays[:config.val.max_volumes], volumes.names[:config.val.max_volumes])
    samples = validation_samples(volumes, config.data, scales=config.val.scales,
                                 patches_per_volume=config.val.patches_per_volume, seed=config.val.seed)
    return task.validator(samples, config.val.chunk)


def train(config: TrainConfig, workdir, *, steps: Optional[int] = None, volumes=None, val_volumes=None,
          quiet: bool = False) -> TrainResult:
    """Train (or resume) the run ``config`` in ``workdir``; returns a summary.

    ``steps`` overrides the run length; ``volumes``/``val_volumes`` replace the config's
    paths (anything ``arssr_jax.data.load_volumes`` takes, e.g. arrays). User errors raise
    ArSSRError; a non-finite loss stops the run (the last good checkpoint is kept).
    """
    if steps is not None:
        config = config.replace(steps=int(steps))
    config.validate()
    main = parallel.is_main_process()
    per_device = parallel.device_batch(config.data.batch_size)
    if volumes is None and not config.data.paths:
        raise ArSSRError("no training data: pass --data (a folder or list file of HR NIfTI volumes)")
    check_workdir(config, workdir)
    # Everything that can be refused is checked before the workdir is touched, so a refused
    # run leaves nothing behind (a half-made workdir would then refuse every other config).
    train_volumes = load_volumes(volumes if volumes is not None else config.data.paths,
                                 cache_dir=config.data.cache_dir, progress=not quiet)
    check_patch_fits(train_volumes, config.data.patch_size)
    steps_per_epoch = config.data.steps_per_epoch(len(train_volumes))
    total = config.total_steps(steps_per_epoch)
    eval_every = config.eval_every_steps(steps_per_epoch)
    task = make_task(config)
    validator = build_validator(config, task, train_volumes, val_volumes)
    tx, schedule = make_optimizer(config.optim, steps_per_epoch)
    state = create_train_state(task.init_params, tx, config.seed)

    workdir, lock = prepare_workdir(config, workdir)
    store = log = iterator = None
    try:
        store = CheckpointStore(workdir, keep_last=config.keep_last)
        start = store.latest_step() or 0
        data_state = None
        if start:
            state, data_state = store.restore(start, state)
            if int(state.step) != start or int(data_state.get("step", start)) != start:
                raise ArSSRError(f"checkpoint {start} in {workdir} is inconsistent (state step {int(state.step)}, "
                                 f"data step {data_state.get('step')}); remove it to resume from an earlier one")
        log = RunLog(workdir, enabled=main, quiet=quiet, start_step=start)
        interpolation = validator.interpolation()
        interp_name = validator.interpolation_name
        iterator = make_train_iterator(config.data, train_volumes, start_step=start)
        if data_state:
            iterator.set_state(data_state)
        log.say(f"{config.name}: {task.description}, {count_params(state.params):,} parameters; "
                f"{len(train_volumes)} training volume(s), {len(validator.samples)} validation patches; "
                f"global batch {config.data.batch_size} = {jax.process_count()} process(es) x "
                f"{jax.local_device_count()} device(s) x {per_device}; {steps_per_epoch} steps/epoch; "
                + (f"resuming at step {start} of {total}" if start else f"{total} steps") + f"; workdir {workdir}")
        if log.events is not None:
            log.say(log.events.message)
        if not start:
            log.record(step=0, event="start", config=config.name, parameters=count_params(state.params),
                       steps_per_epoch=steps_per_epoch, total_steps=total, interpolation=interpolation,
                       interpolation_name=interp_name,
                       processes=jax.process_count(), local_devices=jax.local_device_count())
            log.say(f"{interp_name} interpolation on the validation patches: L1 "
                    f"{interpolation.get('val_l1', float('nan')):.4f}, PSNR "
                    f"{interpolation.get('val_psnr', float('nan')):.2f} dB ({_by_scale(interpolation)})")
        if start >= total:
            log.say(f"nothing to do: the run is at step {start} of {total}")
            return TrainResult(workdir, start, total, steps_per_epoch, store.best_step(),
                               store.metrics(start) or {}, interpolation, None)
        return _run(config, task, tx, schedule, state, iterator, validator, store, log,
                    start=start, total=total, eval_every=eval_every, steps_per_epoch=steps_per_epoch,
                    interpolation=interpolation, workdir=workdir)
    finally:
        if iterator is not None:
            iterator.close()
        if log is not None:
            log.close()
        if store is not None:
            store.close()
        if lock is not None:
            lock.release()


def _run(config, task, tx, schedule, state, iterator, validator, store, log, *, start, total, eval_every,
         steps_per_epoch, interpolation, workdir) -> TrainResult:
    from tqdm import tqdm

    p_step = parallel.pmap_step(make_train_step(task.loss, tx, schedule, axis_name=parallel.AXIS_NAME))
    rstate = parallel.replicate(state)
    global_batch = config.data.batch_size
    log.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   disable=log.quiet or not sys.stderr.isatty(), file=sys.stderr)

    window = {"loss": 0.0, "grad_norm": 0.0, "n": 0, "timed": 0, "t0": None, "lr": None, "paused": 0.0}
    throughput = {"samples": 0, "seconds": 0.0}
    last_saved = start
    validation = {}

    def take(step_no, metrics):
        """Fetch one step's metrics (one step late, so the device stays busy)."""
        values = parallel.unreplicate(metrics)
        loss = float(values["loss"])
        if not bool(values["finite"]):
            kept = f"the last good checkpoint is step {last_saved}" if last_saved else "no checkpoint was written"
            raise ArSSRError(f"training stopped at step {step_no}: the loss became {loss} (grad norm "
                             f"{float(values['grad_norm'])}); {kept} in {workdir}. Lower optim.learning_rate, "
                             "set optim.clip_grad_norm, or check the training volumes")
        if step_no == 1 and task.checks_dead_output and float(values["grad_norm"]) == 0.0:
            raise ArSSRError("the model's output is zero for every input at initialisation (its final ReLU is "
                             "closed), so it cannot learn; set init_output (e.g. 0.5) or change seed in the config")
        now = time.perf_counter()
        window["loss"] += loss
        window["grad_norm"] += float(values["grad_norm"])
        window["n"] += 1
        window["lr"] = float(values["lr"])
        if window["t0"] is None:  # the first step includes compilation: time the steps after it
            window["t0"] = now
        else:
            window["timed"] += 1
        log.bar.update(1)
        if step_no % config.log_every == 0 or step_no == total:
            dt = now - window["t0"] - window["paused"]
            rate = window["timed"] * global_batch / dt if dt > 0 and window["timed"] else None
            if rate:
                throughput["samples"] += window["timed"] * global_batch
                throughput["seconds"] += dt
            mean_loss = window["loss"] / window["n"]
            log.record(step=step_no, epoch=round(step_no / steps_per_epoch, 4), loss=mean_loss, lr=window["lr"],
                       grad_norm=window["grad_norm"] / window["n"], samples_per_s=rate, time=time.time())
            log.scalars(step_no, {"train/loss": mean_loss, "train/lr": window["lr"],
                                  "train/grad_norm": window["grad_norm"] / window["n"], "train/samples_per_s": rate})
            log.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{window['lr']:.2e}",
                                samples_s=f"{rate:.1f}" if rate else "-", refresh=False)
            window.update(loss=0.0, grad_norm=0.0, n=0, timed=0, t0=now, paused=0.0)

    pending = None
    step_no = start
    try:
        while step_no < total:
            batch = next(iterator)
            rstate, metrics = p_step(rstate, parallel.shard(batch))
            step_no += 1
            if pending is not None:
                take(*pending)
            pending = (step_no, metrics)
            if step_no % eval_every == 0 or step_no == total:
                take(*pending)
                pending = None
                paused_at = time.perf_counter()
                host_state = parallel.unreplicate(rstate)
                validation = validator(host_state.params)
                store.save(step_no, host_state, iterator.get_state(), validation)
                last_saved = step_no
                window["paused"] += time.perf_counter() - paused_at  # not training time
                log.record(step=step_no, epoch=round(step_no / steps_per_epoch, 4), event="validation", **validation)
                if log.events is not None:
                    log.events.validation(step_no, validation, interpolation, validator.interpolation_name)
                log.say(f"step {step_no}: val L1 {validation.get('val_l1', float('nan')):.4f}, PSNR "
                        f"{validation.get('val_psnr', float('nan')):.2f} dB ({_by_scale(validation)}); checkpoint saved")
    except KeyboardInterrupt:
        if jax.process_count() == 1 and step_no > last_saved:
            if pending is not None:
                try:
                    take(*pending)
                except ArSSRError:
                    raise KeyboardInterrupt from None
            store.save(step_no, parallel.unreplicate(rstate), iterator.get_state(), None)
            log.say(f"interrupted: checkpoint saved at step {step_no}; run the same command to resume")
        raise
    if pending is not None:
        take(*pending)
    rate = throughput["samples"] / throughput["seconds"] if throughput["seconds"] > 0 else None
    best = store.best_step()
    log.record(step=step_no, event="end", best_step=best, samples_per_s=rate)
    log.bar.close()
    log.say(f"done: step {step_no}, best checkpoint step {best}"
            + (f", {rate:.1f} samples/s" if rate else ""))
    log.plot()
    return TrainResult(workdir, step_no, total, steps_per_epoch, best, validation, interpolation, rate)
