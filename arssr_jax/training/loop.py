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

The loop (:func:`_run`) reads top to bottom: step, hand the step's metrics to
:class:`RunningMetrics` (fetched one step late, checked by :func:`check_step`, averaged
per log interval), and at every validation step :class:`Checkpoints` validates and saves;
an interrupt saves the steps since the last checkpoint. :class:`RunLog` writes every
record, event and console line.
"""

from __future__ import annotations

import contextlib
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
from arssr_jax.training.checkpoints import CHECKPOINT_DIR, CheckpointStore
from arssr_jax.training.config import CONFIG_FILE, TrainConfig, config_differences, load_config, save_config
from arssr_jax.training.events import EventLog
from arssr_jax.training.lock import WorkdirLock
from arssr_jax.training.state import create_train_state, make_optimizer, start_from
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
    """Where a run reports: ``log.jsonl``, TensorBoard event files (main process only), the
    console (unless quiet) and a progress bar on a terminal."""

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

    def start_bar(self, total: int, start: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                        disable=self.quiet or not sys.stderr.isatty(), file=sys.stderr)

    def step_done(self) -> None:
        self.bar.update(1)

    def training(self, step: int, epoch: float, loss: float, lr: float, grad_norm: float,
                 samples_per_s: Optional[float]) -> None:
        """One log interval's means."""
        self.record(step=step, epoch=epoch, loss=loss, lr=lr, grad_norm=grad_norm, samples_per_s=samples_per_s,
                    time=time.time())
        self.scalars(step, {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                            "train/samples_per_s": samples_per_s})
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                             samples_s=f"{samples_per_s:.1f}" if samples_per_s else "-", refresh=False)

    def validation(self, step: int, epoch: float, metrics: dict, interpolation: dict, interpolation_name: str) -> None:
        self.record(step=step, epoch=epoch, event="validation", **metrics)
        if self.events is not None:
            self.events.validation(step, metrics, interpolation, interpolation_name)
        self.say(f"step {step}: val L1 {metrics.get('val_l1', float('nan')):.4f}, PSNR "
                 f"{metrics.get('val_psnr', float('nan')):.2f} dB ({_by_scale(metrics)}); checkpoint saved")

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
    folder = workdir / CHECKPOINT_DIR
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
    parallel.device_batch(config.data.batch_size)  # refuses a batch that does not divide over the devices
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
    task = make_task(config)
    validator = build_validator(config, task, train_volumes, val_volumes)
    tx, schedule = make_optimizer(config.optim, steps_per_epoch)
    state = create_train_state(task.init_params, tx, config.seed)
    if config.init_from is not None and not _has_checkpoints(Path(workdir)):  # a resumed run needs no init model
        state = start_from(state, starting_params(config, state.params), tx)

    workdir, lock = prepare_workdir(config, workdir)
    store = log = iterator = None
    try:
        store = CheckpointStore(workdir, keep_last=config.keep_last)
        start, state, data_state = _restore(store, state, workdir)
        log = RunLog(workdir, enabled=main, quiet=quiet, start_step=start)
        interpolation = validator.interpolation()
        iterator = make_train_iterator(config.data, train_volumes, make_example=task.make_example, start_step=start)
        if data_state:
            iterator.set_state(data_state)
        _announce(log, config, task, state, validator, interpolation, len(train_volumes), steps_per_epoch,
                  start, total, workdir)
        if start >= total:
            log.say(f"nothing to do: the run is at step {start} of {total}")
            return TrainResult(workdir, start, total, steps_per_epoch, store.best_step(),
                               store.metrics(start) or {}, interpolation, None)
        return _run(config, task, tx, schedule, state, iterator, validator, store, log,
                    start=start, total=total, steps_per_epoch=steps_per_epoch, interpolation=interpolation,
                    workdir=workdir)
    finally:
        if iterator is not None:
            iterator.close()
        if log is not None:
            log.close()
        if store is not None:
            store.close()
        if lock is not None:
            lock.release()


def starting_params(config: TrainConfig, fresh):
    """The parameters of the model ``config.init_from`` names, checked against the run's own
    (``fresh``, its random initialisation): same tree, same shapes, same residual mode."""
    from arssr_jax.weights import load_model  # the weights package reads workdirs: imported late
    from arssr_jax.weights.params import check_shapes, tree_shapes

    _, params, loaded = load_model(config.init_from)
    source = f"init_from={config.init_from!r}"
    fix = f"set model to the loaded model's config ({loaded.encoder}, feature_dim {loaded.feature_dim})"
    if loaded.residual != config.model.residual:
        raise ArSSRError(f"{source} has residual={loaded.residual!r} but the run's model has "
                         f"residual={config.model.residual!r}; {fix}")
    check_shapes(tree_shapes(fresh), params, source, what="the run's model", fix=fix)
    return params


def _restore(store: CheckpointStore, state, workdir):
    """``(start step, state, data iterator state)``: the latest checkpoint's, or a fresh start's."""
    start = store.latest_step() or 0
    if not start:
        return 0, state, None
    state, data_state = store.restore(start, state)
    if int(state.step) != start or int(data_state.get("step", start)) != start:
        raise ArSSRError(f"checkpoint {start} in {workdir} is inconsistent (state step {int(state.step)}, "
                         f"data step {data_state.get('step')}); remove it to resume from an earlier one")
    return start, state, data_state


def _announce(log: RunLog, config: TrainConfig, task, state, validator, interpolation: dict, num_volumes: int,
              steps_per_epoch: int, start: int, total: int, workdir: Path) -> None:
    """The run's first console line(s); a new run's ``start`` record with the interpolation bar."""
    parameters = count_params(state.params)
    per_device = parallel.device_batch(config.data.batch_size)
    log.say(f"{config.name}: {task.description}, {parameters:,} parameters; "
            f"{num_volumes} training volume(s), {len(validator.samples)} validation patches; "
            f"global batch {config.data.batch_size} = {jax.process_count()} process(es) x "
            f"{jax.local_device_count()} device(s) x {per_device}; {steps_per_epoch} steps/epoch; "
            + (f"resuming at step {start} of {total}" if start else f"{total} steps") + f"; workdir {workdir}")
    if log.events is not None:
        log.say(log.events.message)
    if start:
        log.record(step=start, event="resume", total_steps=total)
        return
    name = validator.interpolation_name
    log.record(step=0, event="start", config=config.name, parameters=parameters,
               steps_per_epoch=steps_per_epoch, total_steps=total, interpolation=interpolation,
               interpolation_name=name, processes=jax.process_count(), local_devices=jax.local_device_count())
    log.say(f"{name} interpolation on the validation patches: L1 "
            f"{interpolation.get('val_l1', float('nan')):.4f}, PSNR "
            f"{interpolation.get('val_psnr', float('nan')):.2f} dB ({_by_scale(interpolation)})")


class RunningMetrics:
    """The train step's metrics, fetched one step late (the host never makes the device wait),
    checked, and averaged over each ``log_every`` window for the log.

    The window's clock starts where the previous window ended (the first: at the first
    step's fetch, so compilation is not timed); time spent in :meth:`paused` (validation,
    checkpoints) is not training time.
    """

    def __init__(self, log: RunLog, check, *, global_batch: int, log_every: int, total: int, steps_per_epoch: int):
        self.log = log
        self.check = check  # check(step_no, values) raises ArSSRError for a step that must stop the run
        self.global_batch, self.log_every, self.total = global_batch, log_every, total
        self.steps_per_epoch = steps_per_epoch
        self._pending = None
        self._samples, self._seconds = 0, 0.0  # timed samples and seconds over the whole run
        self._open_window(t0=None)

    def _open_window(self, t0) -> None:
        self._loss, self._grad_norm, self._lr = 0.0, 0.0, None
        self._steps, self._timed, self._paused = 0, 0, 0.0
        self._t0 = t0

    def push(self, step_no: int, metrics) -> None:
        """Hold this step's metrics (still on the device); fetch the previous step's."""
        previous, self._pending = self._pending, (step_no, metrics)
        if previous is not None:
            self._take(*previous)

    def flush(self) -> None:
        """Fetch the held step's metrics now."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._take(*pending)

    @contextlib.contextmanager
    def paused(self):
        began = time.perf_counter()
        yield
        self._paused += time.perf_counter() - began

    @property
    def samples_per_s(self) -> Optional[float]:
        """Mean training throughput of the run so far (after compilation)."""
        return self._samples / self._seconds if self._seconds > 0 else None

    def _take(self, step_no: int, metrics) -> None:
        values = parallel.unreplicate(metrics)
        self.check(step_no, values)
        now = time.perf_counter()
        self._loss += float(values["loss"])
        self._grad_norm += float(values["grad_norm"])
        self._lr = float(values["lr"])
        self._steps += 1
        if self._t0 is None:  # the first step includes compilation: time the steps after it
            self._t0 = now
        else:
            self._timed += 1
        self.log.step_done()
        if step_no % self.log_every == 0 or step_no == self.total:
            self._close_window(step_no, now)

    def _close_window(self, step_no: int, now: float) -> None:
        seconds = now - self._t0 - self._paused
        rate = self._timed * self.global_batch / seconds if seconds > 0 and self._timed else None
        if rate:
            self._samples += self._timed * self.global_batch
            self._seconds += seconds
        self.log.training(step_no, round(step_no / self.steps_per_epoch, 4), loss=self._loss / self._steps,
                          lr=self._lr, grad_norm=self._grad_norm / self._steps, samples_per_s=rate)
        self._open_window(t0=now)


def check_step(step_no: int, values: dict, *, last_saved: int, workdir: Path, checks_dead_output: bool) -> None:
    """Stop the run (ArSSRError) at a step whose loss or gradient is not finite, and at a first
    step with an exactly zero gradient when that means the model cannot learn."""
    loss = float(values["loss"])
    if not bool(values["finite"]):
        kept = f"the last good checkpoint is step {last_saved}" if last_saved else "no checkpoint was written"
        raise ArSSRError(f"training stopped at step {step_no}: the loss became {loss} (grad norm "
                         f"{float(values['grad_norm'])}); {kept} in {workdir}. Lower optim.learning_rate, "
                         "set optim.clip_grad_norm, or check the training volumes")
    if step_no == 1 and checks_dead_output and float(values["grad_norm"]) == 0.0:
        raise ArSSRError("the model's output is zero for every input at initialisation (its final ReLU is "
                         "closed), so it cannot learn; set init_output (e.g. 0.5) or change seed in the config")


class Checkpoints:
    """Validation and checkpoints: every ``eval_every`` steps and at the end (with the
    validation metrics, which pick the best checkpoint), and on an interrupt (without)."""

    def __init__(self, store: CheckpointStore, validator, iterator, eval_every: int, total: int, start: int):
        self.store, self.validator, self.iterator = store, validator, iterator
        self.eval_every, self.total = eval_every, total
        self.last_saved = start
        self.validation: dict = {}  # the last validation's metrics

    def due(self, step_no: int) -> bool:
        return step_no % self.eval_every == 0 or step_no == self.total

    def evaluate_and_save(self, step_no: int, rstate) -> dict:
        host_state = parallel.unreplicate(rstate)
        self.validation = self.validator(host_state.params)
        self.store.save(step_no, host_state, self.iterator.get_state(), self.validation)
        self.last_saved = step_no
        return self.validation

    def save_interrupted(self, step_no: int, rstate, metrics: RunningMetrics, log: RunLog) -> None:
        """Ctrl-C or SIGTERM: checkpoint the steps done since the last checkpoint, so the same
        command resumes there. Single-process runs only (the processes of a multi-process run
        would not stop at the same step); nothing is saved when the held step was not finite."""
        if jax.process_count() != 1 or step_no <= self.last_saved:
            return
        try:
            metrics.flush()
        except ArSSRError:
            return
        self.store.save(step_no, parallel.unreplicate(rstate), self.iterator.get_state(), None)
        log.say(f"interrupted: checkpoint saved at step {step_no}; run the same command to resume")


def _run(config, task, tx, schedule, state, iterator, validator, store, log, *, start, total, steps_per_epoch,
         interpolation, workdir) -> TrainResult:
    p_step = parallel.pmap_step(make_train_step(task.loss, tx, schedule, axis_name=parallel.AXIS_NAME))
    rstate = parallel.replicate(state)
    checkpoints = Checkpoints(store, validator, iterator, config.eval_every_steps(steps_per_epoch), total, start)

    def check(step_no, values):  # names the last checkpoint written so far
        check_step(step_no, values, last_saved=checkpoints.last_saved, workdir=workdir,
                   checks_dead_output=task.checks_dead_output)

    metrics = RunningMetrics(log, check, global_batch=config.data.batch_size, log_every=config.log_every,
                             total=total, steps_per_epoch=steps_per_epoch)
    log.start_bar(total, start)
    step_no = start
    try:
        while step_no < total:
            rstate, step_metrics = p_step(rstate, parallel.shard(next(iterator)))
            step_no += 1
            metrics.push(step_no, step_metrics)
            if checkpoints.due(step_no):
                metrics.flush()
                with metrics.paused():
                    validation = checkpoints.evaluate_and_save(step_no, rstate)
                log.validation(step_no, round(step_no / steps_per_epoch, 4), validation, interpolation,
                               validator.interpolation_name)
    except KeyboardInterrupt:
        checkpoints.save_interrupted(step_no, rstate, metrics, log)
        raise
    metrics.flush()
    return _finish(log, store, metrics, checkpoints, workdir, step_no, total, steps_per_epoch, interpolation)


def _finish(log: RunLog, store: CheckpointStore, metrics: RunningMetrics, checkpoints: Checkpoints, workdir: Path,
            step_no: int, total: int, steps_per_epoch: int, interpolation: dict) -> TrainResult:
    """The ``end`` record, the last console line and the curves."""
    rate, best = metrics.samples_per_s, store.best_step()
    log.record(step=step_no, event="end", best_step=best, samples_per_s=rate)
    log.bar.close()
    log.say(f"done: step {step_no}, best checkpoint step {best}" + (f", {rate:.1f} samples/s" if rate else ""))
    log.plot()
    return TrainResult(workdir, step_no, total, steps_per_epoch, best, checkpoints.validation, interpolation, rate)
