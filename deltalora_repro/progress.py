"""What to watch while a run runs: progress bars (tqdm) and a TensorBoard log.

Progress bars: `train.progress` = auto (a bar only when stderr is a terminal, tqdm's
`disable=None`), true (always) or false (never). The choice is held in a context variable that
the trainer sets around training, evaluation and the test, so that the tasks' evaluation loops,
beam search and scoring draw bars without every task interface growing a display option.

TensorBoard: `train.tensorboard` (default true) writes `<output_dir>/tensorboard/` with
`torch.utils.tensorboard.SummaryWriter`: the training loss, learning rate and tokens/s at every
log point, and every evaluation metric at every epoch end, against the optimizer step.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .errors import ConfigError

log = logging.getLogger(__name__)

PROGRESS_CHOICES = ("auto", "true", "false")

# tqdm's `disable`: None = only on a terminal, False = always shown, True = never.
_disable: contextvars.ContextVar[bool | None] = contextvars.ContextVar("progress_disable",
                                                                       default=None)


def disable_flag(choice: Any) -> bool | None:
    """train.progress (auto | true | false, YAML booleans included) as tqdm's `disable`."""
    key = str(choice).lower() if isinstance(choice, (bool, str)) else None
    if key not in PROGRESS_CHOICES:
        raise ConfigError(f"train.progress {choice!r}; valid: {', '.join(PROGRESS_CHOICES)}")
    return {"auto": None, "true": False, "false": True}[key]


@contextlib.contextmanager
def progress_bars(choice: Any) -> Iterator[None]:
    """Within this block, bar() follows `choice` (train.progress). Log lines written to the
    console meanwhile go through tqdm, so that they print above the bars instead of through them."""
    token = _disable.set(disable_flag(choice))
    try:
        with logging_redirect_tqdm():
            yield
    finally:
        _disable.reset(token)


def bar(iterable: Iterable | None = None, *, desc: str, leave: bool = False, **kwargs) -> tqdm:
    """A tqdm bar on stderr that obeys the current train.progress choice (other keywords go to
    tqdm: total, initial, unit)."""
    return tqdm(iterable, desc=desc, leave=leave, disable=_disable.get(), dynamic_ncols=True,
                **kwargs)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """A start and an end line (with its duration) for a step that has no natural bar, such as
    one metric computed by an external tool."""
    log.info("%s: started", name)
    t0 = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", name, time.perf_counter() - t0)


class Board:
    """The run's TensorBoard log, or nothing at all when switched off (every call a no-op)."""

    def __init__(self, log_dir: Path | None, purge_step: int | None = None):
        self.writer = None
        if log_dir is not None:
            # Imported here: TensorBoard pulls in protobuf and friends, which a run with the log
            # switched off (and every command other than training) need not pay for.
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: a resumed run discards the events the interrupted one wrote after its
            # checkpoint, so the curves do not fold back on themselves.
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, Any], step: int, prefix: str) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            # Metrics dicts may hold non-numeric fields; a NaN is kept (TensorBoard shows it).
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
