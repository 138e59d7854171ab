"""The console shared by the stages, progress bars and plain progress lines (library side: no typer here).

On a terminal, ``make_progress`` is a live rich bar. Off a terminal (output redirected to a file
or a pipe, e.g. a SLURM log) a live bar renders nothing useful, so ``make_progress`` returns a
``PlainProgress``: the same calls, each task logged as one plain line at every 10 % of its
total and at least every ``PLAIN_EVERY_S`` seconds. Training loops log ``StepLines`` there
instead (what a bar cannot show: the loss terms and the learning rate).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

LOG_WIDTH = 160  # the console's width off a terminal (rich's default there is 80), unless $COLUMNS says

console = Console(stderr=True)
if not console.is_terminal:  # a log file keeps whole lines and whole tables, not 80 columns of them
    console.soft_wrap = True
    console.width = console.width if "COLUMNS" in os.environ else LOG_WIDTH

log = logging.getLogger("kdpipe")

PLAIN_EVERY_S = 60.0  # off a terminal: a progress line at least this often (and at every 10 % of the total)


def interactive() -> bool:
    """Whether the console is a terminal (live bars) rather than a file or a pipe (plain lines)."""
    return console.is_terminal


def duration(seconds: float) -> str:
    """h:mm:ss, e.g. '0:01:05'; '?' when unknown (infinite or NaN)."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _count(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,.1f}"


class RateColumn(ProgressColumn):
    """Items per second, e.g. '812.3 samples/s'."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{speed:,.1f} {self.unit}/s", style="cyan")


@dataclass
class _PlainTask:
    description: str
    total: float | None
    completed: float
    info: str
    started: float  # clock at add_task
    start_count: float  # completed at add_task (a resumed run's earlier work is not this session's rate)
    printed: float  # clock of the last line
    decile: int  # tenths of the total done at the last line
    shown: float | None = None  # completed count of the last line


@dataclass
class PlainProgress:
    """``make_progress`` off a terminal: the rich ``Progress`` calls the stages make (``add_task``,
    ``update``, ``advance``, a ``with`` block) printed as plain lines, e.g.

        extract train: 1,200/9,600 img (12%), 81.2 img/s, elapsed 0:00:15, ETA 0:01:43, shard-000001: 1000 ok

    A task prints a line when it crosses a tenth of its total, when ``every_s`` seconds have passed
    since its last line, and when the block ends (if its last line is not its final count). The
    rate is this session's mean since ``add_task``. Lines go to the ``kdpipe`` logger (INFO), like
    every other line of a log file, so each has the time the CLI's log format gives it.
    """

    unit: str
    disable: bool = False
    every_s: float = PLAIN_EVERY_S
    clock: Callable[[], float] = time.monotonic
    tasks: dict[int, _PlainTask] = field(default_factory=dict)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for task in self.tasks.values():
            if task.shown != task.completed:
                self._print(task)

    def add_task(self, description: str, total: float | None = 100.0, completed: float = 0, **fields: Any) -> int:
        now = self.clock()
        decile = self._decile(total, completed)
        self.tasks[len(self.tasks)] = _PlainTask(description, total, completed, str(fields.get("info", "")), now,
                                                 completed, now, decile, completed)
        return len(self.tasks) - 1

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **fields: Any) -> None:
        task = self.tasks[task_id]
        task.total = total if total is not None else task.total
        task.completed = completed if completed is not None else task.completed + (advance or 0)
        task.description = description if description is not None else task.description
        task.info = str(fields["info"]) if "info" in fields else task.info
        decile = self._decile(task.total, task.completed)
        if decile > task.decile or self.clock() - task.printed >= self.every_s:
            self._print(task)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    @staticmethod
    def _decile(total: float | None, completed: float) -> int:
        return int(10 * completed // total) if total else 0

    def line(self, task: _PlainTask) -> str:
        """The task's line: what, done/total (%), rate, elapsed, ETA, its info."""
        elapsed = self.clock() - task.started
        rate = (task.completed - task.start_count) / elapsed if elapsed > 0 else math.nan
        done = _count(task.completed)
        if task.total:
            done = f"{done}/{_count(task.total)} {self.unit} ({100 * task.completed / task.total:.0f}%)"
        else:
            done = f"{done} {self.unit}"
        parts = [done, f"{rate:,.1f} {self.unit}/s" if math.isfinite(rate) else f"? {self.unit}/s",
                 f"elapsed {duration(elapsed)}"]
        if task.total:
            eta = (task.total - task.completed) / rate if rate > 0 else math.inf
            parts.append(f"ETA {duration(max(eta, 0.0))}")
        return f"{task.description}: " + ", ".join(parts + ([task.info] if task.info else []))

    def _print(self, task: _PlainTask) -> None:
        if not self.disable:
            log.info(self.line(task))
        task.printed, task.shown = self.clock(), task.completed
        task.decile = self._decile(task.total, task.completed)


Bar = Progress | PlainProgress  # what make_progress returns


def make_progress(unit: str = "samples", disable: bool = False) -> Bar:
    """A live bar with count, rate, elapsed and remaining time on a terminal; plain lines elsewhere.

    Per-task text goes in the ``info`` field: ``progress.add_task("train", total=n, info="")``
    then ``progress.update(task, advance=b, info="loss 0.31")``.
    """
    if not interactive():
        return PlainProgress(unit, disable=disable)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
    )


def line_every(total_steps: int, multiple_of: int = 1, lines: int = 100) -> int:
    """Steps between training lines when none is set: about ``lines`` lines per run, a multiple of
    ``multiple_of`` (the metrics rows' interval), at least one of it."""
    steps = max(1, math.ceil(total_steps / lines))
    return max(multiple_of, math.ceil(steps / multiple_of) * multiple_of)


@dataclass
class StepLines:
    """A training loop's plain lines: one every ``every`` steps and at the last, e.g.

        train step 120/1,200 (10%) ep 1: loss 4.1234 (clip 1.2000, crd 2.0000, fd 0.9234), lr 1.00e-03,
        812.3 samples/s, ETA 0:12:03

    The loss and its terms are means over the steps since the last line (non-finite ones left out:
    a skipped step has its own warning); samples/s is over those steps' own time. The ETA is the
    wall clock since this session's first step, per step, so validations and checkpoints count in it.
    Written with the ``kdpipe`` logger (INFO) when ``enabled``.
    """

    name: str  # "train", "pretrain"
    stop: int  # the step the run stops at
    every: int
    samples_per_step: int
    start: int = 0  # the step this session starts from (a resumed run's)
    enabled: bool = True
    clock: Callable[[], float] = time.perf_counter
    _sums: dict[str, float] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)
    _steps: int = 0  # steps since the last line, and their time
    _seconds: float = 0.0

    def __post_init__(self) -> None:  # made just before the loop's first step
        self._t0 = self.clock()

    def add(self, step: int, seconds: float, loss: float, terms: dict[str, float], lr: float,
            epoch: int | None = None) -> None:
        """After step ``step`` (1-based), which took ``seconds``: add its loss and terms; print the line when due."""
        self._steps, self._seconds = self._steps + 1, self._seconds + seconds
        for name, value in {"loss": loss, **terms}.items():
            if math.isfinite(value):
                self._sums[name] = self._sums.get(name, 0.0) + value
                self._counts[name] = self._counts.get(name, 0) + 1
        if step % self.every == 0 or step >= self.stop:
            if self.enabled:
                log.info(self.line(step, lr, epoch))
            self._sums, self._counts, self._steps, self._seconds = {}, {}, 0, 0.0

    def line(self, step: int, lr: float, epoch: int | None) -> str:
        mean = {k: self._sums[k] / self._counts[k] for k in self._sums}
        terms = ", ".join(f"{k} {v:.4f}" for k, v in mean.items() if k != "loss")
        rate = self._steps * self.samples_per_step / self._seconds if self._seconds > 0 else math.nan
        per_step = (self.clock() - self._t0) / (step - self.start) if step > self.start else math.nan
        head = f"{self.name} step {step:,}/{self.stop:,} ({100 * step / self.stop:.0f}%)"
        head += f" ep {epoch}" if epoch is not None else ""
        return (f"{head}: loss {mean.get('loss', math.nan):.4f}" + (f" ({terms})" if terms else "")
                + f", lr {lr:.2e}, " + (f"{rate:,.1f} samples/s" if math.isfinite(rate) else "? samples/s")
                + f", ETA {duration((self.stop - step) * per_step)}")
