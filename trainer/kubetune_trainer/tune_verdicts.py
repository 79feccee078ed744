"""Tune's verdict on a trial's result, told back to the trial's workers.

Ray Tune reports a trial's results one way only: rank 0's ray.train.report goes through the Train
controller's health check (every 2 s) and the trial actor to Tune, whose scheduler (ASHA) decides, and a
STOP ends the trial actor. Its Train controller and workers, owned by that actor, die some time after.
Until then they train on, and a small model on a fast machine gets through the rest of its steps, its
checkpoint and its export in that time: an early-stopped trial used its GPUs past the rung it lost at, and
left a model behind as if it had finished.

So at each ASHA rung (kubetune_trainer.tune_space.asha_milestones) a trial's workers wait for the verdict
on the result they just reported: the driver's TrialTracker posts every verdict on a board (a Ray actor of
the driver), and a STOP ends the trial's training loop there, with no checkpoint and no export. Between
rungs nothing waits: ASHA only decides at rungs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

log = logging.getLogger("kubetune_trainer")

# How long a trial's workers wait for a verdict before training on (a result Tune never saw, say); the
# verdict normally comes within the Train controller's health-check interval (2 s) and Tune's loop.
VERDICT_TIMEOUT_S = 120.0
POLL_S = 0.05


class VerdictBoard:
    """The driver's verdicts per trial: the newest judged step, and whether Tune stopped the trial."""

    def __init__(self) -> None:
        self.judged: dict[str, int] = {}
        self.stopped: set[str] = set()

    async def post(self, trial: str, step: int, stop: bool) -> None:
        self.judged[trial] = max(step, self.judged.get(trial, step))
        if stop:
            self.stopped.add(trial)

    async def verdict(self, trial: str, step: int, timeout: float) -> bool | None:
        """True: Tune stopped the trial; False: it goes on past `step`; None: no verdict within `timeout`."""
        deadline = time.monotonic() + timeout
        while trial not in self.stopped and self.judged.get(trial, -1) < step:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(POLL_S)
        return trial in self.stopped


def start_board() -> tuple[Any, str]:
    """Start the board (a 0-CPU Ray actor owned by the calling driver); returns (handle, name). Named per
    driver: a retried driver starts its own, and its trials are told its name."""
    import ray

    name = f"kubetune-verdicts-{uuid.uuid4().hex[:12]}"
    actor: Any = ray.remote(num_cpus=0, max_concurrency=1000)(VerdictBoard)  # type: ignore[call-overload]  # ray's stubs type remote() for functions
    return actor.options(name=name).remote(), name


def await_verdict(board: str, trial: str, step: int) -> bool:
    """In a trial's worker, after reporting the result of `step`: whether Tune stopped the trial on it."""
    import ray

    t0 = time.monotonic()
    pending: Any = ray.get_actor(board).verdict.remote(trial, step, VERDICT_TIMEOUT_S)
    stop: bool | None = ray.get(pending)
    if stop is None:
        log.warning("no verdict from Tune on %s step %d in %.0fs; training on", trial, step, VERDICT_TIMEOUT_S)
        return False
    log.info(
        "Tune's verdict on %s at step %d: %s (%.1fs)", trial, step, "stop" if stop else "go on", time.monotonic() - t0
    )
    return bool(stop)
