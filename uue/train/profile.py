"""Where a training step's time goes: per-phase times on every step, and a torch.profiler trace of chosen steps.

`PhaseClock` times the phases of a step (data, user tower, item tower, loss and gather, backward, optimizer).
On CUDA each phase is a pair of CUDA events recorded on the stream and read after the step, when the step's
metrics have already waited for the device: timing adds no host sync inside the step. On CPU the work is
synchronous and wall clocks measure it. The code inside a step marks its phases with `phase(name)`, which does
nothing unless a clock is measuring (tests, evaluation and serving call the same functions untimed).

`StepProfiler` records `training.profile_steps: [first, last]` with torch.profiler on every process and writes
one Chrome trace per rank (Perfetto and TensorBoard's profiler read it) under output_dir/profile; the phases
appear in it as named ranges (uue.user_tower, ...).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch

PHASES = ("data", "to_device", "user_tower", "item_tower", "loss", "backward", "optimizer")
"""The phases a step logs as time/<phase> seconds, in step order."""

_measuring: PhaseClock | None = None


def phase(name: str) -> contextlib.AbstractContextManager:
    """Marks a phase of the step being measured; a no-op when no clock measures (one global read)."""
    clock = _measuring
    return contextlib.nullcontext() if clock is None else clock.phase(name)


class PhaseClock:
    """Seconds per phase of one step: CUDA events on a CUDA device (read after the step), wall clocks elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.annotate = False
        """Also mark each phase as a torch.profiler range (while a StepProfiler records)."""
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def measuring(self) -> Iterator[PhaseClock]:
        """Makes `phase(...)` time into this clock while the block runs."""
        global _measuring
        previous, _measuring = _measuring, self
        try:
            yield self
        finally:
            _measuring = previous

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        annotation = torch.profiler.record_function(f"uue.{name}") if self.annotate else contextlib.nullcontext()
        with annotation:
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                start.record()
                try:
                    yield
                finally:
                    end = torch.cuda.Event(enable_timing=True)
                    end.record()
                    self._events.append((name, start, end))
            else:
                started = time.perf_counter()
                try:
                    yield
                finally:
                    self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        """A phase measured on the host (the data phase: streaming and collating happen before the step)."""
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def read(self) -> dict[str, float]:
        """{"time/<phase>": seconds} of the phases since the last read, and reset. Call after the step: on CUDA
        it waits for the last phase's end event (already passed once the step's metrics reached the host)."""
        seconds = dict(self._seconds)
        if self._events:
            self._events[-1][2].synchronize()
            for name, start, end in self._events:
                seconds[name] = seconds.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        self._events, self._seconds = [], {}
        order = {name: i for i, name in enumerate(PHASES)}
        return {f"time/{name}": seconds[name] for name in sorted(seconds, key=lambda n: order.get(n, len(order)))}


def trace_path(folder: Path, rank: int, first: int, last: int) -> Path:
    """The trace file of one rank: the rank in its name (every worker writes one), the suffix TensorBoard reads."""
    return folder / f"rank{rank}.steps{first}-{last}.pt.trace.json"


class StepProfiler:
    """torch.profiler over steps first..last (training.profile_steps) of one process; writes its trace when the
    last of them ends, or when the run ends inside the range (`close`)."""

    def __init__(self, steps: tuple[int, int], folder: Path, rank: int, device: torch.device):
        self.first, self.last = steps
        self.folder = folder
        self.rank = rank
        self.device = device
        self.trace: Path | None = None
        """The trace written, once written."""
        self._profiler: torch.profiler.profile | None = None
        self._step_range: torch.profiler.record_function | None = None

    @property
    def recording(self) -> bool:
        return self._profiler is not None

    def begin(self, step: int) -> None:
        """Before step `step` trains (1-based); a resumed run starting inside the range records what is left."""
        if self._profiler is None and self.trace is None and self.first <= step <= self.last:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.start()
        if self._profiler is not None:
            self._step_range = torch.profiler.record_function(f"uue.train_step#{step}")
            self._step_range.__enter__()

    def end(self, step: int) -> None:
        """After step `step` (its metrics read); stops and writes the trace after the last profiled step."""
        if self._step_range is not None:
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        if self._profiler is not None and step >= self.last:
            self.close()

    def close(self) -> None:
        """Stop and write the trace if recording (a run that ends before `last` still leaves its trace)."""
        if self._profiler is None:
            return
        if self._step_range is not None:
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = trace_path(self.folder, self.rank, self.first, self.last)
        profiler.export_chrome_trace(str(path))
        self.trace = path
