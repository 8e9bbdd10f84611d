"""Generic step types every pipeline can use: ``echo``, ``notify`` and ``approve``.

``python:package.module:function`` steps need no registration: the compiler imports and types them.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from typing import Any, Literal

from pydantic import Field

from slipway.flows.errors import FlowError
from slipway.flows.steptypes import StepContext, step_type
from slipway.policies.kinds import Strict

log = logging.getLogger("slipway.notify")


class NotifyError(FlowError):
    """A webhook refused or could not be reached: the ``notify`` step fails with why."""


class EchoInput(Strict):
    values: dict[str, Any] = Field(default_factory=dict, description="Values to pass on unchanged. Default {}.")


class EchoOutput(Strict):
    values: dict[str, Any]


@step_type("echo")
def echo(ctx: StepContext, inp: EchoInput) -> EchoOutput:
    """Pass values through: a no-op step that names values for downstream steps."""
    return EchoOutput(values=inp.values)


class NotifyInput(Strict):
    message: str = Field(min_length=1, description="Text of the notification.")
    webhook: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="URL that receives a JSON POST {text, pipeline, run_id, step, level}. Default: log only.",
    )
    level: Literal["info", "warning", "error"] = Field(default="info", description="Severity. Default info.")
    timeout: float = Field(
        default=10.0, gt=0, le=120, description="Seconds to wait for the webhook, 0-120. Default 10."
    )


class NotifyOutput(Strict):
    delivered: bool
    via: Literal["webhook", "log"]
    status: int | None = None


@step_type("notify")
def notify(ctx: StepContext, inp: NotifyInput) -> NotifyOutput:
    """Send a message to a webhook (Slack-compatible JSON with ``text``), or log it."""
    level = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}[inp.level]
    log.log(level, "[%s %s/%s] %s", ctx.pipeline, ctx.run_id[:8], ctx.step, inp.message)
    if inp.webhook is None:
        return NotifyOutput(delivered=True, via="log")
    body = {"text": inp.message, "pipeline": ctx.pipeline, "run_id": ctx.run_id, "step": ctx.step, "level": inp.level}
    req = urllib.request.Request(
        inp.webhook, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=inp.timeout) as resp:
            return NotifyOutput(delivered=True, via="webhook", status=resp.status)
    except urllib.error.HTTPError as e:
        raise NotifyError(f"webhook answered {e.code} {e.reason}") from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise NotifyError(f"webhook unreachable: {getattr(e, 'reason', e)}") from e


class ApproveInput(Strict):
    message: str = Field(default="", description="What the approver is asked to decide. Default empty.")
    subject: str | None = Field(
        default=None,
        description="What is approved, e.g. version:demo:3 (an approval of it lets a protected alias move). "
        "Default run:RUN_ID/STEP.",
    )
    role: str | None = Field(default=None, description="Role the approver must hold. Default: anyone.")
    timeout: float = Field(
        default=7 * 24 * 3600.0, gt=0, description="Seconds to wait before the step fails. Default 7 days."
    )


class ApproveOutput(Strict):
    approved: bool
    approver: str
    approval_id: int
    comment: str
    at: str


# Prefect pauses the whole flow run; two approval steps of one run wait one after the other.
_pause_locks: dict[str, threading.Lock] = {}


@step_type("approve")
def approve(ctx: StepContext, inp: ApproveInput) -> ApproveOutput:
    """Pause the run until a person approves (``slipway approve RUN_ID``); a rejection fails the step."""
    from slipway.flows import approvals

    lock = _pause_locks.setdefault(ctx.run_id, threading.Lock())
    with lock:
        given = approvals.wait_for_approval(ctx, subject=inp.subject, role=inp.role, timeout=inp.timeout)
    if given.decision != "approved":
        raise approvals.Rejected(f"rejected by {given.approver}" + (f": {given.comment}" if given.comment else ""))
    return ApproveOutput(
        approved=True, approver=given.approver, approval_id=given.id, comment=given.comment, at=given.at
    )
