"""The Provider kind: a hosted upstream declared like every document, checked with file:line errors, secrets only
as references."""

from __future__ import annotations

import pytest

from slipway.policies.errors import PolicyError
from slipway.policies.loader import load_text

OPENAI = """\
apiVersion: slipway/v1
kind: Provider
name: openai-mini
api: openai
base_url: https://api.openai.com/v1
model: gpt-4o-mini
api_key: ${OPENAI_API_KEY}
price: {prompt_per_1k: 0.00015, completion_per_1k: 0.0006}
"""
BEDROCK = """\
apiVersion: slipway/v1
kind: Provider
name: claude
api: bedrock
region: us-east-1
model: anthropic.claude-3-5-haiku-20241022-v1:0
"""


def test_an_openai_compatible_and_a_bedrock_provider_load_with_their_defaults():
    docs = load_text(OPENAI + "---\n" + BEDROCK)
    openai, bedrock = docs.get("Provider", "openai-mini"), docs.get("Provider", "claude")
    assert (openai.api, openai.base_url, openai.api_key, openai.auth_header) == (
        "openai", "https://api.openai.com/v1", "${OPENAI_API_KEY}", "Authorization",
    )  # fmt: skip
    assert openai.price.completion_per_1k == 0.0006 and openai.timeouts.first_token_s == 30.0
    assert (bedrock.region, bedrock.aws_access_key_id, bedrock.price) == ("us-east-1", None, None)


@pytest.mark.parametrize(
    ("doc", "change", "message"),
    [
        (OPENAI, ("base_url: https://api.openai.com/v1\n", ""), "api openai needs base_url"),
        (OPENAI, ("${OPENAI_API_KEY}", "sk-live-1234"), "api_key must be a reference"),
        (OPENAI, ("model: gpt-4o-mini\n", "model: gpt-4o-mini\nregion: us-east-1\n"), "region and aws_"),
        (BEDROCK, ("region: us-east-1\n", ""), "api bedrock needs region"),
        (BEDROCK, ("region: us-east-1\n", "region: us-east-1\naws_access_key_id: ${K}\n"), "go together"),
        (BEDROCK, ("region: us-east-1\n", "region: us-east-1\napi_key: ${K}\n"), "base_url and api_key are for"),
        (OPENAI, ("api: openai", "api: azure"), "api"),
        (OPENAI, ("model: gpt-4o-mini\n", "model: x\ntimeouts: {first_token_s: 60, total_s: 10}\n"), "total_s"),
    ],
    ids=[
        "no-base-url",
        "raw-key",
        "aws-on-openai",
        "no-region",
        "half-aws-keys",
        "key-on-bedrock",
        "unknown-api",
        "timeouts",
    ],
)
def test_an_incomplete_or_unsafe_provider_is_an_error_at_its_file_and_line(doc, change, message):
    with pytest.raises(PolicyError) as e:
        load_text(doc.replace(*change), file="providers/p.yaml")
    assert message in str(e.value) and "providers/p.yaml:" in str(e.value)
