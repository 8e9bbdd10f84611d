"""The ``validate_data`` step: a dataset checked against a DataSuite with Great Expectations, before training.

The dataset is pinned by content digest and registered; the per-expectation result is stored with that
Dataset record, pass or fail. A failure raises :class:`DataValidationFailed` naming every failing expectation
with its counts, so the pipeline stops there and nothing downstream trains on bad data.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from slipway.flows.errors import FlowError
from slipway.flows.steptypes import StepContext, step_type
from slipway.policies.kinds import DocRef, Strict


class DataValidationFailed(FlowError):
    """A dataset does not meet its DataSuite; the message lists the failing expectations."""


class ValidateDataInput(Strict):
    dataset: str = Field(
        min_length=1,
        description="Dataset to check: NAME (SLIPWAY_HOME/datasets/NAME.jsonl), a .jsonl path, file:// or s3:// URI.",
    )
    suite: Annotated[str, DocRef("DataSuite")] = Field(description="DataSuite to check it against.")


class ValidateDataOutput(Strict):
    dataset: str = Field(description="The dataset reference, to pass on to finetune.")
    digest: str = Field(description="sha256:<hex> of the dataset's bytes.")
    dataset_id: int = Field(description="Id of the Dataset record holding the validation result.")
    rows: int
    checks: int = Field(description="Number of expectations run (all passed).")


@step_type("validate_data")
def validate_data(ctx: StepContext, inp: ValidateDataInput) -> ValidateDataOutput:
    """Check a dataset against a DataSuite with Great Expectations; stop the pipeline if it fails."""
    from slipway import datasets
    from slipway.flows.steps import _datacheck as datacheck
    from slipway.registry import catalog

    suite = ctx.documents.get("DataSuite", inp.suite)
    ds = datasets.resolve(inp.dataset)
    rows = ds.rows()
    report = datacheck.validate_rows(suite, rows)
    columns = sorted({k for r in rows for k in r})
    with ctx.session() as s:
        record = catalog.register_dataset(
            s, name=ds.name, digest=ds.digest, uri=ds.uri, rows=len(rows), columns=columns
        )
        catalog.record_validation(s, record, suite=suite.name, passed=report.success, result=report.as_dict())
        dataset_id = record.id
    if not report.success:
        raise DataValidationFailed(f"dataset {inp.dataset} ({ds.digest[:19]}…): {report.summary()}")
    ctx.logger.info("dataset %s (%s): %s", inp.dataset, ds.digest[:19], report.summary())
    return ValidateDataOutput(
        dataset=inp.dataset, digest=ds.digest, dataset_id=dataset_id, rows=len(rows), checks=len(report.checks)
    )
