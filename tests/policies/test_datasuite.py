"""DataSuite documents and the validate_data step (Great Expectations on the demo datasets)."""

from __future__ import annotations

import textwrap

import pytest

from slipway.flows.steps.data import DataValidationFailed, ValidateDataInput, validate_data
from slipway.policies.errors import PolicyError
from slipway.policies.loader import load_text
from slipway.registry import catalog

SUITE = """\
apiVersion: slipway/v1
kind: DataSuite
name: s
{body}
"""


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("columns: []", "a DataSuite needs columns, rows or expectations"),
        ("rows: {min: 10, max: 5}", "min (10) is above max (5)"),
        ("expectations:\n  - notMatch: {column: prompt, regex: '([a-z'}", "invalid regular expression"),
        ("expectations:\n  - nonNull: {column: prompt}", "each expectation is one of notNull, unique, length"),
        ("expectations:\n  - unique: {column: id, mostly: 2}", "less than or equal to 1"),
    ],
    ids=["empty", "bounds", "regex", "unknown-expectation", "mostly"],
)
def test_malformed_datasuite_is_rejected_with_the_reason(body: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_text(SUITE.format(body=textwrap.dedent(body)), "suite.yaml")


def test_shipped_chat_sft_suite_loads(llm_env) -> None:
    suite = llm_env.docs.get("DataSuite", "chat-sft")
    assert suite.columns == ["id", "prompt", "completion"]
    assert {next(iter(type(e).model_fields)) for e in suite.expectations} >= {"notNull", "unique", "notMatch"}


def test_clean_dataset_passes_and_result_is_stored_with_the_dataset(llm_env) -> None:
    out = validate_data(llm_env.ctx("check-data"), ValidateDataInput(dataset="demo/train", suite="chat-sft"))
    assert out.rows == 2000 and out.checks == 13 and out.digest.startswith("sha256:")
    with llm_env.registry.session() as s:
        ds = catalog.get_dataset(s, "demo/train", out.digest)
        assert ds.validation_status == "passed" and ds.validation_suite == "chat-sft"
        assert ds.validation_result["engine"] == "great_expectations"
        assert all(c["success"] for c in ds.validation_result["checks"])


def test_pii_and_null_dataset_fails_naming_expectations_and_counts(llm_env) -> None:
    with pytest.raises(DataValidationFailed) as err:
        validate_data(llm_env.ctx("check-data"), ValidateDataInput(dataset="demo/train-pii", suite="chat-sft"))
    msg = str(err.value)
    assert "4 of 13 expectations of DataSuite 'chat-sft' failed on 2000 rows" in msg
    assert "notNull(completion): 34 unexpected (1.7%)" in msg
    assert "notMatch(prompt, email): 87 unexpected (4.3%)" in msg
    assert "notMatch(prompt, phone): 62 unexpected" in msg
    assert "notMatch(prompt, card number): 40 unexpected" in msg
    with llm_env.registry.session() as s:
        ds = catalog.get_dataset(s, "demo/train-pii")
        assert ds.validation_status == "failed"
        email = next(c for c in ds.validation_result["checks"] if c["name"] == "notMatch(prompt, email)")
        assert email["unexpected_count"] == 87
        # The finding names the PII without copying it into the registry.
        assert email["examples"] and all("<email>" in e and "@" not in e for e in email["examples"])


def test_unknown_dataset_names_the_file_and_the_fix(llm_env) -> None:
    with pytest.raises(
        Exception, match=r"dataset 'demo/nope' not found: no file .*nope.jsonl \(run `slipway bootstrap`"
    ):
        validate_data(llm_env.ctx("check-data"), ValidateDataInput(dataset="demo/nope", suite="chat-sft"))
