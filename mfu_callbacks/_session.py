"""What every integration does, in framework-neutral terms: see micro-batches, bracket steps, read metrics.

The integrations only translate their framework's events into these calls and hand the metrics to
the framework's logger.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from typing import Any

import torch
from torch import nn

from . import _status, _wandb, distributed
from ._generate_watch import GenerateWatch, generate_lengths
from ._guard import Guard, entry_point
from ._options import MFUOptions
from ._status import Status
from ._torch_internals import call_keywords
from .attribution import format_breakdown, write_breakdown
from .meter import MFUMeter, device_of, join_reduction_as_failed
from .metrics import MFU_STATUS, RENAMED, MFUStatus
from .report import format_report
from .run_summary import SummaryWriter, describe_setup, library_versions

logger = logging.getLogger("mfu_callbacks")


class MeterSession:
    """One training run's meter, built lazily, with every call guarded."""

    def __init__(
        self,
        options: MFUOptions,
        owner: str,
        *,
        wandb_prefix: str | None = None,
        wandb_step_metric: str | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        """``wandb_prefix``: how the metric names appear in W&B (the framework may add its own prefix);
        ``wandb_step_metric``: the framework's global-step key in W&B, the axis MFU is plotted against;
        ``warn``: says that MFU is not measured where the framework's users look (default: a warning).
        """
        self.options = options
        self._owner = owner
        self._wandb_prefix = options.prefix if wandb_prefix is None else wandb_prefix
        self._wandb_step_metric = wandb_step_metric
        self._warn = warn or _warn
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._generate_watch: GenerateWatch | None = None
        self._other_models: torch.utils.hooks.RemovableHandle | None = None  # see ``_watch_other_models``
        self._own_modules: set[int] = set()  # ids of the watched model's modules, while that hook is in
        self._resume_state: Mapping[str, Any] | None = None
        self.summary_dir: str | None = None  # where the run summary (mfu_summary.json) is written
        self.start_run()

    def start_run(self) -> None:
        """A run starts: whatever an earlier run left (finished, failed or interrupted) is cleared."""
        self.unwatch()
        earlier: SummaryWriter | None = getattr(self, "_summary", None)
        if earlier is not None:
            with suppress(Exception):  # an interrupted run's file: what it wrote stays
                earlier.close()
        self.guard = Guard(self._owner)
        self._extras_guard = Guard(self._owner, stops="writing the run summary and the W&B run description")
        self.meter: MFUMeter | None = None
        self.optimizer_steps = 0  # the framework's global step: continued on resume
        self._steps_this_run = 0  # warm-up starts again in a resumed process
        self._resumed_at: int | None = None  # the global step a resumed run continues from
        self._step_open = False
        self._pause: AbstractContextManager[None] | None = None  # open while evaluating or saving
        self._renamed: set[str] = set()  # our keys the trainer or the user logs too: logged as mfu/<key>
        self._attached = False
        self._wandb_described = False
        self._model: nn.Module | None = None
        self._summary: SummaryWriter | None = None  # opened at the first window written
        self._setup_described: dict[str, Any] | None = None  # the setup, described once per run
        self._summary_status: dict[str, Any] | None = None  # the status the header last said
        self.status: Status = _status.WARMING_UP  # what the last read (or the end of the run) found
        self._warned: set[MFUStatus] = set()

    def attach(self, model: nn.Module, *, dtype: str | None = None) -> None:
        """Create the meter for ``model`` (continuing a resumed run's totals, if any were loaded)."""

        def create() -> None:
            self.meter = MFUMeter(
                model,
                peak_tflops=self.options.peak_tflops,
                dtype=self.options.dtype,
                run_dtype=dtype,
                warmup_steps=self.options.warmup_steps,
                forward=self.options.forward,
                token_counter=self.options.token_counter,
                device=device_of(model),
                silence_diagnostics=self.options.silence_diagnostics,
                real_step=self.options.real_step,
                profile_steps=self.options.profile_steps,
                profile_start=self.options.profile_start,
            )
            if self._resume_state is not None:
                saved_step = self._resume_state.get(_SAVED_STEP)
                if self._resumed_at is None and isinstance(saved_step, int) and saved_step > 0:
                    self.continue_from_step(saved_step)
                self._load_or_discard(self.meter, self._resume_state)
                self._resume_state = None

        self._attached = True
        self._model = model
        self.guard.run(distributed.prepare_reductions)  # collective: attach runs on every rank
        self.guard.run(create)

    # -- resuming -----------------------------------------------------------------------------------
    def continue_from_step(self, global_step: int) -> None:
        """A resumed run goes on from the framework's ``global_step``: windows are numbered from there,
        and the run summary keeps the windows written up to it."""
        self.optimizer_steps = self._resumed_at = int(global_step)

    def state_dict(self) -> dict[str, Any]:
        """The meter's state for the framework's checkpoint (plain values; {} before a meter exists).

        Called when the framework saves a checkpoint: the run summary is made durable then too.
        """
        self._extras_guard.run(self._sync_summary)
        if self.meter is not None and not self.guard.failed:
            state: dict[str, Any] = self.guard.run(self.meter.state_dict) or {}
            return {**state, _SAVED_STEP: self.optimizer_steps} if state else {}
        return dict(self._resume_state or {})

    def load_state_dict(self, state: Mapping[str, Any], *, when_attached: bool = False) -> None:
        """Continue a checkpointed run: applied to the meter now if it exists, else when it is built
        (always then with ``when_attached``: the framework restores before the run starts)."""
        if not state:
            return
        if not isinstance(state, Mapping):
            self._warn(
                f"mfu_callbacks: ignored a saved MFU state that is a {type(state).__name__}; run totals start afresh"
            )
            return
        if self.meter is not None and not when_attached:
            self._load_or_discard(self.meter, state)
        else:
            self._resume_state = dict(state)

    def _load_or_discard(self, meter: MFUMeter, state: Mapping[str, Any]) -> None:
        """Continue the saved run totals; a corrupt or foreign-version state is discarded with one
        warning and measuring goes on from this run's steps alone."""
        before = meter.state_dict()
        try:
            meter.load_state_dict(state)
        except Exception as error:  # noqa: BLE001 - a bad checkpoint file never stops measuring
            meter.load_state_dict(before)
            self._warn(
                f"mfu_callbacks: ignored the saved MFU state ({type(error).__name__}: {str(error)[:200]}); "
                "the run totals start afresh from this run's steps"
            )

    # -- micro-batches seen by a forward pre-hook (when the framework hands callbacks no batch) --
    def watch_forward(self, model: nn.Module) -> None:
        """Count each training forward of ``model`` as a micro-batch of the open step, and let its
        forwards without grad inside the step (a reference, KL or scoring pass) open the step's
        observation when they come first."""
        self.unwatch()  # a run that ended by an exception may have left its hook
        hook = torch.compiler.disable(self._before_forward)
        self._hook = model.register_forward_pre_hook(hook, with_kwargs=True)
        self._generate_watch = GenerateWatch(model, self._generation_begins, self._generation_ends)

    @entry_point()
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The forward pre-hook (returns None: the call's arguments go through unchanged)."""
        if self.generating:
            return  # a forward inside generate: counted by the generation phase, never as training
        if not module.training:
            if not self._step_open:
                self.pause()  # an evaluation between two steps: not training, until the next step
            return  # evaluation is not a training step
        if not torch.is_grad_enabled():
            if self._step_open and self.meter is not None:  # a pass without grad inside the step
                self._stop_watching_other_models()
                self.guard.run(self.meter.add_forward, _call_as_batch(module, args, kwargs))
            return
        if not self._step_open:
            self.begin_step()
        self._stop_watching_other_models()
        self.add_batch(_call_as_batch(module, args, kwargs))

    def _watch_other_models(self) -> None:
        """From the start of a step whose real step is to be observed until its first forward of the
        watched model, a hook on every module looks for a pass without grad of another model (GRPO's
        reference model, which TRL builds itself, scores the completions before the policy's training
        forward): the observation opens there, so that this pass is counted too."""
        meter = self.meter
        if self._hook is None or self._other_models is not None or meter is None or self.guard.failed:
            return
        if meter.awaits_first_pass and self._model is not None:
            self._own_modules = {id(module) for module in self._model.modules()}
            hook = torch.compiler.disable(self._before_other_forward)
            self._other_models = torch.nn.modules.module.register_module_forward_pre_hook(hook)

    def _stop_watching_other_models(self) -> None:
        handle, self._other_models = self._other_models, None
        if handle is not None:
            handle.remove()
            self._own_modules = set()

    @entry_point()
    def _before_other_forward(self, module: nn.Module, args: tuple) -> None:
        """The hook on every module (returns None): the first call without grad outside ``generate``
        of a module not in the watched model is the outermost of another model's pass."""
        if id(module) in self._own_modules or torch.is_grad_enabled() or self.generating:
            return
        self._stop_watching_other_models()
        kwargs = call_keywords(module)
        if self.meter is not None and self._step_open and (args or kwargs):
            self.meter.add_forward(_call_as_batch(module, args, kwargs or {}), other_model=True)

    def unwatch(self) -> None:
        """Remove the forward hook, and leave a real step being observed (however the run ended)."""
        self._stop_watching_other_models()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        watch, self._generate_watch = getattr(self, "_generate_watch", None), None
        if watch is not None:
            watch.remove()
        meter = getattr(self, "meter", None)
        if meter is not None:
            with suppress(Exception):  # the run is over: nothing more to measure
                meter.stop_observing()

    # -- generation inside the step: a phase of its own (``_generation.py``) -----------------------------
    @property
    def generating(self) -> bool:
        """Whether the watched model's ``generate`` is running (its forwards are not training forwards)."""
        meter = self.meter
        return meter is not None and not self.guard.failed and meter.generating

    @entry_point()
    def _generation_begins(self) -> None:
        """``generate`` was called: inside a step, its time is the generation phase's."""
        if self.meter is not None and self._step_open and not self.guard.failed:
            self.meter.generation_begins()

    @entry_point()
    def _generation_ends(self, args: tuple, kwargs: dict, output: Any) -> None:
        """``generate`` returned (``output`` None: it raised): its time ends, its lengths are counted."""
        meter = self.meter
        if meter is None or not meter.generating or self.guard.failed:
            return
        meter.generation_ends()
        model = self._model
        lengths = (
            generate_lengths(model, args, kwargs, output)
            if model is not None and output is not None
            else None
        )
        if lengths is not None:
            prompt, completion, padded_prompt, padded_completion = lengths
            meter.add_generation(
                prompt, completion, padded_prompt=padded_prompt, padded_completion=padded_completion
            )

    # -- step events ------------------------------------------------------------------------------
    @property
    def step_open(self) -> bool:
        return self._step_open

    # Steps are followed even without a working meter: the read cadence (``due``) must stay the same
    # on every rank, since each read is a collective.
    def begin_step(self, batch: Any = None) -> None:
        self.resume()  # whatever paused the time between the steps, training goes on now
        if self._step_open:
            return
        self._step_open = True
        if self.meter is not None:
            self.guard.run(self.meter.start_step, batch)
            self.guard.run(self._watch_other_models)

    def add_batch(self, batch: Any) -> None:
        if self.meter is not None and self._step_open:
            self.guard.run(self.meter.add_batch, batch)

    def end_step(self) -> None:
        if not self._step_open:
            return
        self._step_open = False
        self._stop_watching_other_models()
        self.optimizer_steps += 1
        self._steps_this_run += 1
        if self.meter is not None:
            self.guard.run(self.meter.end_step)

    # -- what is not training: evaluation runs and checkpoint saves -------------------------------------
    def pause(self) -> None:
        """Work that is not training begins (evaluation, a checkpoint save): until ``resume()`` or the
        next step begins, its time is neither step time nor input wait (``StepTimer.paused``), so it
        never lowers MFU nor reads as waiting for input. Pausing again while paused changes nothing."""
        meter = self.meter
        if self._pause is not None or meter is None:
            return

        def enter() -> AbstractContextManager[None]:
            pause = meter.not_training()
            pause.__enter__()
            return pause

        self._pause = self.guard.run(enter)

    def resume(self) -> None:
        """Training goes on: the time after this counts again (nothing happens when not paused)."""
        pause, self._pause = self._pause, None
        if pause is not None:
            self.guard.run(pause.__exit__, None, None, None)

    @property
    def paused(self) -> bool:
        return self._pause is not None

    @contextmanager
    def not_training(self) -> Iterator[None]:
        """``pause()`` around a block (ends the pause only if it opened it)."""
        opened = self._pause is None
        self.pause()
        try:
            yield
        finally:
            if opened:
                self.resume()

    def due(self, framework_logs_now: bool) -> bool:
        """Whether to read metrics now: at the framework's cadence, or every ``log_interval`` steps."""
        if self.options.log_interval is None:
            return framework_logs_now
        return self.optimizer_steps > 0 and self.optimizer_steps % self.options.log_interval == 0

    def read(self) -> dict[str, float]:
        """Metrics of the window since the last read, prefixed; {} when there is nothing to say.

        When distributed this is a collective, and a rank whose measurement failed still takes part
        (as "failed"), so no rank ever waits for another. The invariant, enforced here and in the
        meter's read: **every rank enters exactly one reduction per read**. The meter's read enters it
        whatever fails inside; a failure before it (or a failed meter) joins it as "failed" in the
        ``finally`` below; a failure after it only stops this rank's measuring.
        """
        entered = distributed.reductions_entered()
        try:
            return self._read()
        except Exception as error:  # noqa: BLE001 - training goes on; the guard says it once
            self.guard.fail(error)
            return self._prefixed({MFU_STATUS: float(MFUStatus.OFF)})
        finally:
            if distributed.reductions_entered() == entered:
                self._join_as_failed()

    def _read(self) -> dict[str, float]:
        meter = self.meter
        if meter is None or self.guard.failed:
            return self._prefixed(self._with_status({}))
        own_work = self.guard.run(meter.own_work)  # the whole read is counted as the meter's time
        with own_work if own_work is not None else nullcontext():
            metrics: dict[str, float] = (
                self.guard.run(meter.metrics, read_at=self._steps_this_run, default={}) or {}
            )
            if metrics:
                # Reporting extras have a guard of their own: a failure there never stops the measurement.
                if not self._wandb_described:
                    self._extras_guard.run(self._describe_wandb_run)
                self._extras_guard.run(self._add_to_run_summary, metrics)
            return self._prefixed(self._with_status(metrics))

    def _prefixed(self, metrics: Mapping[str, float]) -> dict[str, float]:
        return {self.options.prefix + key: value for key, value in metrics.items()}

    def beside(self, row: Collection[str], metrics: Mapping[str, float]) -> dict[str, float]:
        """``metrics`` (from ``read()``) as they go into a logged row that already holds the keys ``row``.

        Never overwrite: where the trainer or the user logged one of our keys (GRPO's own ``step_time``),
        ours goes beside it as ``mfu/<key>`` after the prefix (``mfu/step_time``, ``train/mfu/step_time``),
        under that name for the rest of the run, so a curve never changes meaning. Where that name is
        taken too, ours is left out.
        """
        placed: dict[str, float] = {}
        prefix = self.options.prefix
        for key, value in metrics.items():
            if key in row or key in self._renamed:
                if key not in self._renamed:
                    self._renamed.add(key)
                    logger.info(
                        "mfu_callbacks: %r is logged by the trainer too; ours is logged beside it", key
                    )
                bare = key[len(prefix) :] if key.startswith(prefix) else key
                key = prefix + RENAMED + bare
                if key in row:
                    continue
            placed[key] = value
        return placed

    # -- the status: whether MFU is measured, said where users look ----------------------------------
    def _with_status(self, metrics: dict[str, float]) -> dict[str, float]:
        """``metrics`` with ``mfu_status``; a status without MFU is warned about once per run."""
        self._set_status(self._judge(metrics))
        return {**metrics, MFU_STATUS: float(self.status.code)}

    def _judge(self, values: Mapping[str, float]) -> Status:
        meter = self.meter
        if self.guard.failed:
            return _status.stopped(self.guard.reason or "", self.guard.fix or "")
        if meter is None:
            return _status.stopped("no model was given to measure", "pass the model when training starts")
        return _status.judge(
            values,
            self.status,
            engine_built=meter.engine is not None,
            past_warmup=self._steps_this_run > self.options.warmup_steps,
            peak_device=str(meter.device) if meter.peak is None else None,
        )

    def _set_status(self, status: Status) -> None:
        self.status = status
        if status.code not in (MFUStatus.MEASURING, MFUStatus.WARMING_UP) and status.code not in self._warned:
            self._warned.add(status.code)
            self._warn(status.message())

    def _final_status(self, summary: Mapping[str, float]) -> None:
        """The run's status as it ends: a window left without MFU by a rank's failure still counts."""
        status = self._judge(summary)
        if status.measuring and self.status.code == MFUStatus.NOT_COUNTED:
            status = self.status
        self._set_status(status)

    def _join_as_failed(self, *, final: bool = False) -> None:
        """Enter the read's reduction as a rank with nothing to say (none after a reduction failed)."""
        if self._attached and distributed.is_distributed() and distributed.reductions_broken() is None:
            with suppress(Exception):  # the collective itself failed: nothing more to do here
                join_reduction_as_failed(read_at=self._steps_this_run, final=final)

    def write_summary_to(self, framework_folder: str | os.PathLike[str] | None) -> None:
        """Write the run summary into the ``summary_dir`` option, else the framework's output folder."""
        folder = self.options.summary_dir or framework_folder
        self.summary_dir = str(folder) if folder is not None else None

    # -- the run summary: one line per window, the header when it changes (rank 0) ------------------
    def _add_to_run_summary(self, metrics: Mapping[str, float]) -> None:
        """Append the window (its cost does not grow with the run or the model: the setup is
        described once, at the first window, and again only at checkpoints and at the end)."""
        writer = self._summary_writer()
        if writer is None:
            return
        if self._setup_described is None:
            self._setup_described = self._setup()
        window = self.meter.last_window if self.meter is not None else None
        writer.append(self.optimizer_steps, metrics, window.totals() if window is not None else None)
        status = self.status.as_dict()
        if status != self._summary_status:
            writer.write_header(self._setup_described, status, totals=self._run_totals())
            self._summary_status = status

    def _sync_summary(self, *, close: bool = False) -> None:
        """Describe the setup as it is now, write the header and make both files durable (a
        checkpoint is being saved, or the run ends)."""
        writer = self._summary_writer(open_if_needed=close)
        if writer is None:
            return
        self._setup_described = self._setup()
        self._summary_status = self.status.as_dict()
        writer.write_header(self._setup_described, self._summary_status, totals=self._run_totals())
        if close:
            writer.close()
            self._summary = None
        else:
            writer.sync()

    def _run_totals(self) -> dict[str, float] | None:
        """The run's totals as the report divides them, once a step was read."""
        meter = self.meter
        if meter is None or meter.last_window is None:
            return None
        return meter.run_totals()

    def _summary_writer(self, *, open_if_needed: bool = True) -> SummaryWriter | None:
        """The run summary's writer on rank 0 when a folder is known; opened on first use."""
        if self.summary_dir is None or distributed.rank() != 0:
            return None
        if self._summary is None and open_if_needed:
            self._summary = SummaryWriter(self.summary_dir, resume_after=self._resumed_at)
        return self._summary

    def _describe_wandb_run(self) -> None:
        """The run config says how MFU was measured: the run summary's setup and the library versions."""
        run = _wandb.active_run()
        if run is None or self.meter is None:
            return
        self._wandb_described = True
        meter, engine = self.meter, self.meter.engine
        config = {
            **self._setup(),
            **_wandb.run_config(
                meter.peak, engine.flops_per_token if engine is not None else None, meter.run_flops()
            ),
            "versions": library_versions(),
        }
        _wandb.describe_run(run, config, self._wandb_prefix, self._wandb_step_metric)

    def _setup(self) -> dict[str, Any]:
        meter = self.meter
        if meter is None:
            return {}
        return describe_setup(
            peak=meter.peak,
            world_size=distributed.world_size(),
            flops=meter.run_flops(),
            model=self._model,
            device=str(meter.device),
            dtype=meter.peak.dtype if meter.peak is not None else None,
            parallelism=meter.parallelism.as_config(),
            matmul_dtypes=meter.matmul_dtypes(),
            peak_per_dtype=meter.dtype_peaks() is not None,
        )

    def summary(self) -> dict[str, float]:
        """The run's means (a collective when distributed, joined as "failed" after a failure; exactly
        one reduction whatever fails, as in ``read``)."""
        entered = distributed.reductions_entered()
        try:
            if self.meter is None or self.guard.failed:
                return {}
            return self.guard.run(self.meter.summary, read_at=self._steps_this_run, default={}) or {}
        finally:
            if distributed.reductions_entered() == entered:
                self._join_as_failed(final=True)

    def finish(self) -> dict[str, float]:
        """Training ended: the run's summary (a collective when distributed: every rank calls this),
        printed as the end-of-run report on rank 0 and written to the W&B run summary."""
        self.resume()
        self.unwatch()
        summary = self.summary()
        with suppress(Exception):  # every rank has left the last reduction: nothing of ours outlives the run
            distributed.release_reductions()
        self._final_status(summary)
        self._extras_guard.run(self._sync_summary, close=True)  # the setup as the run ended
        meter = self.meter
        if meter is None or not summary:
            self._extras_guard.run(self._report_not_measured)
            return summary

        def report() -> None:
            diagnoses = meter.diagnostics()
            breakdown = meter.step_breakdown()
            if distributed.rank() != 0:
                return
            if self.options.report:
                text = format_report(
                    summary,
                    meter.run_flops(),
                    meter.peak,
                    diagnoses,
                    self.status,
                    meter.matmul_dtypes(),
                    device=str(meter.device),
                )
                if breakdown is not None:
                    text += "\n" + format_breakdown(breakdown)
                elif meter.profile_note:
                    text += "\n  " + meter.profile_note
                print(text, flush=True)
            if breakdown is not None and self.summary_dir is not None:
                write_breakdown(breakdown, self.summary_dir)
            run = _wandb.active_run()
            if run is not None:
                _wandb.summarize_run(run, summary, diagnoses, self.status)
                if breakdown is not None:
                    _wandb.log_breakdown(run, breakdown)

        self.guard.run(report)
        return summary

    def _report_not_measured(self) -> None:
        """A run that measured nothing still ends with the report and the W&B summary saying why (rank 0)."""
        if distributed.rank() != 0:
            return
        peak = self.meter.peak if self.meter is not None else None
        device = str(self.meter.device) if self.meter is not None else None
        if self.options.report:
            print(format_report({}, None, peak, (), self.status, device=device), flush=True)
        run = _wandb.active_run()
        if run is not None:
            _wandb.summarize_run(run, {}, (), self.status)


_SAVED_STEP = "optimizer_steps"  # the global step in the saved state (frameworks without one of their own)


def _warn(message: str) -> None:
    """The default way to say that MFU is not measured: a Python warning, shown by default."""
    warnings.warn(message, UserWarning, stacklevel=2)


def _call_as_batch(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """The batch a forward call was given: its keywords, with positional arguments named by the
    forward's signature (``model(input_ids, attention_mask=mask)``); a lone positional batch as is."""
    if not args:
        return kwargs
    if not kwargs:
        return args[0] if len(args) == 1 else args
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return kwargs
    batch: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            batch.update(value)
        else:
            batch[name] = value
    return batch
