"""Functions that test pipelines use as ``python:tests.pipeline_steps:NAME`` steps."""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field

from slipway.flows.steptypes import StepContext
from slipway.policies.kinds import Strict


class SleepInput(Strict):
    seconds: float = Field(ge=0)
    label: str = ""


class SleepOutput(Strict):
    label: str
    started: float
    finished: float


def sleep(inp: SleepInput) -> SleepOutput:
    started = time.time()
    time.sleep(inp.seconds)
    return SleepOutput(label=inp.label, started=started, finished=time.time())


class FlakyInput(Strict):
    counter: str = Field(description="File that counts the calls.")
    failures: int = Field(ge=0, description="Calls that fail before one succeeds.")


class FlakyOutput(Strict):
    calls: int


def flaky(inp: FlakyInput) -> FlakyOutput:
    """Fail ``failures`` times (counted in a file, so a resumed run sees earlier calls), then succeed."""
    path = Path(inp.counter)
    calls = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(calls))
    if calls <= inp.failures:
        raise RuntimeError(f"flaky failure {calls} of {inp.failures}")
    return FlakyOutput(calls=calls)


class AddInput(Strict):
    a: int
    b: int = 0


class AddOutput(Strict):
    total: int


def add(ctx: StepContext, inp: AddInput) -> AddOutput:
    return AddOutput(total=inp.a + inp.b)


class CountedInput(Strict):
    counter: str


class CountedOutput(Strict):
    calls: int


def counted(inp: CountedInput) -> CountedOutput:
    """Count its own executions in a file, to show which steps a resumed run re-executes."""
    path = Path(inp.counter)
    calls = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(calls))
    return CountedOutput(calls=calls)


class BusyInput(Strict):
    seconds: float


class BusyOutput(Strict):
    done: bool


def busy(inp: BusyInput) -> BusyOutput:
    """Sleep in small slices, so a timeout can interrupt it between them."""
    end = time.monotonic() + inp.seconds
    while time.monotonic() < end:
        time.sleep(0.05)
    return BusyOutput(done=True)


# A step type with a compensation, for the runner's undo test.
class ReserveInput(Strict):
    ledger: str = Field(description="File the step appends to; its undo appends a release.")
    item: str


class ReserveOutput(Strict):
    item: str


def _release(ctx: StepContext, outputs: dict) -> str:
    with open(ctx.params["ledger"], "a") as f:
        f.write(f"release {outputs['item']}\n")
    return f"released {outputs['item']}"


# Registered as ``test_reserve`` (with ``_release`` as its undo) by the test that uses it, for that test only.
def reserve(ctx: StepContext, inp: ReserveInput) -> ReserveOutput:
    with open(inp.ledger, "a") as f:
        f.write(f"reserve {inp.item}\n")
    return ReserveOutput(item=inp.item)
