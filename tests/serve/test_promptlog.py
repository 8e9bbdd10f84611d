"""Prompt/response logs: opt-in per model, PII redacted, encrypted (transit of a real OpenBao server, or a KMS data
key from moto in server mode), stored in the artifact store, deleted after retention with an audit event."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from slipway.artifacts import open_store
from slipway.governance import retention
from slipway.secrets import VaultClient, VaultSettings
from slipway.serve import promptlog
from slipway.serve.promptlog import KmsEncryptor, PromptLogError, PromptLogger, TransitEncryptor, redact
from tests.plugins.openbao import PROMPTS_KEY, SLIPWAY_POLICY

# One worker runs the whole module in order, so the last test sees every log line the others produced.
pytestmark = [pytest.mark.usefixtures("all_log_lines"), pytest.mark.xdist_group("promptlog")]

EMAIL, PHONE, CARD = "ana.lopez@example.org", "+1 415-555-0132", "4111 1111 1111 1111"
PROMPT = f"My card is {CARD}, mail me at {EMAIL} or call {PHONE}. What is the refund policy?"
ANSWER = "Refunds take 5 business days."
SENSITIVE = [EMAIL, PHONE, CARD, "4111111111111111", "What is the refund policy", ANSWER]


@pytest.mark.parametrize(
    "text, expected",
    [
        (f"write to {EMAIL}", "write to [EMAIL]"),
        ("call (415) 555-0132 now", "call [PHONE] now"),
        (f"call {PHONE}", "call [PHONE]"),
        (f"card {CARD}.", "card [CARD]."),
        ("card 4111-1111-1111-1111", "card [CARD]"),
        ("order 4111 1111 1111 1112 is not a card", "order 4111 1111 1111 1112 is not a card"),  # fails Luhn
        ("version 2.13.0 in 2026", "version 2.13.0 in 2026"),
    ],
    ids=["email", "phone-parens", "phone-intl", "card-spaces", "card-dashes", "not-luhn", "no-pii"],
)
def test_redaction(text, expected):
    assert redact(text) == expected


def slipway_transit(bao):
    """The prompt-log encryptor as production has it: the ``slipway`` policy, the ``slipway-prompts`` key."""
    return TransitEncryptor(VaultClient(VaultSettings(addr=bao.url, token=bao.token(policies=[SLIPWAY_POLICY]))),
                            PROMPTS_KEY)  # fmt: skip


def test_vault_transit_logs_are_redacted_encrypted_and_readable(openbao, tmp_path):
    store = open_store((tmp_path / "art").as_uri())
    enc = slipway_transit(openbao)
    mark = openbao.audit_mark()
    logger = PromptLogger(store=store, encryptor=enc, models=["demo"], batch_size=2)
    assert logger.log(model="other", version=1, request_id="r0", prompt=PROMPT, response=ANSWER) is False
    assert logger.log(model="demo", version=3, request_id="r1", prompt=[{"role": "user", "content": PROMPT}],
                      response=ANSWER)  # fmt: skip
    assert store.list("prompt-logs") == []  # buffered until the batch is full
    logger.log(model="demo", version=3, request_id="r2", prompt=PROMPT, response=ANSWER)
    keys = store.list("prompt-logs")
    assert len(keys) == 1 and keys[0].startswith(f"prompt-logs/demo/{dt.datetime.now(dt.UTC):%Y-%m-%d}/")
    raw = store.read_bytes(keys[0]).decode()
    assert [s for s in SENSITIVE if s in raw] == []  # only ciphertext is stored
    assert json.loads(raw)["envelope"]["ciphertext"].startswith("vault:v")
    records = promptlog.read(store, keys[0], enc)
    assert [r["request_id"] for r in records] == ["r1", "r2"]
    assert records[0]["prompt"] == [
        {"role": "user", "content": "My card is [CARD], mail me at [EMAIL] or call [PHONE]. What is the refund policy?"}
    ]
    transit = [c for c in openbao.calls(mark) if c.startswith("update transit/")]
    assert transit == [f"update transit/encrypt/{PROMPTS_KEY}", f"update transit/decrypt/{PROMPTS_KEY}"]


def test_vault_transit_logs_sealed_before_a_key_rotation_still_open(openbao, tmp_path):
    """Rotation (an operator's act; the slipway policy may not rotate) moves new batches to the new key version;
    batches sealed with the old one still open. The key is a fresh one, so the session's slipway-prompts stays v1."""
    root = openbao.client()
    root.secrets.transit.create_key(name="rotation-test", key_type="aes256-gcm96")
    enc = TransitEncryptor(VaultClient(VaultSettings(addr=openbao.url, token=openbao.root_token)), "rotation-test")
    store = open_store((tmp_path / "art").as_uri())
    logger = PromptLogger(store=store, encryptor=enc, models=["demo"])
    logger.log(model="demo", version=1, request_id="before", prompt=PROMPT, response=ANSWER)
    (old,) = logger.flush()
    root.secrets.transit.rotate_key(name="rotation-test")
    logger.log(model="demo", version=1, request_id="after", prompt=PROMPT, response=ANSWER)
    (new,) = logger.flush()
    envelopes = [json.loads(store.read_bytes(store.key(r.uri)))["envelope"]["ciphertext"][:9] for r in (old, new)]
    assert envelopes == ["vault:v1:", "vault:v2:"]
    assert [promptlog.read(store, store.key(r.uri), enc)[0]["request_id"] for r in (old, new)] == ["before", "after"]


def test_kms_data_key_logs_in_s3_and_tampering_is_detected(s3):
    enc = KmsEncryptor(s3.kms, s3.kms_key_id)
    logger = PromptLogger(store=s3.store, encryptor=enc, models=["demo"])
    logger.log(model="demo", version=1, request_id="r1", prompt=PROMPT, response=ANSWER)
    (ref,) = logger.flush()
    key = s3.store.key(ref.uri)
    head = s3.s3.head_object(Bucket=s3.bucket, Key=key)
    assert head["ServerSideEncryption"] == "aws:kms"  # and the object itself is SSE-KMS at rest
    raw = s3.store.read_bytes(key).decode()
    assert [s for s in SENSITIVE if s in raw] == [] and json.loads(raw)["envelope"]["alg"] == "kms+aes-256-gcm"
    assert promptlog.read(s3.store, key, enc)[0]["response"] == ANSWER
    obj = json.loads(raw)
    obj["envelope"]["ciphertext"] = obj["envelope"]["ciphertext"][:-8] + "AAAAAAA="
    s3.store.put(key, json.dumps(obj).encode())
    with pytest.raises(PromptLogError, match="it was altered or sealed with another key"):
        promptlog.read(s3.store, key, enc)


def test_prompt_logs_past_retention_are_deleted_from_s3_and_audited(s3, sqlite_registry):
    from slipway.registry import audit

    enc = KmsEncryptor(s3.kms, s3.kms_key_id)
    logger = PromptLogger(store=s3.store, encryptor=enc, models=["demo"])
    now = dt.datetime.now(dt.UTC)
    for days in (40, 31, 1):
        logger.log(model="demo", version=1, request_id=f"r{days}", prompt=PROMPT, response=ANSWER,
                   ts=now - dt.timedelta(days=days))  # fmt: skip
        logger.flush()
    purged = retention.purge(
        sqlite_registry, usage_before=None, prompt_logs_before=now - dt.timedelta(days=30), store=s3.store
    )
    assert purged.prompt_logs == 2
    left = s3.store.list("prompt-logs")
    assert len(left) == 1 and f"/{now - dt.timedelta(days=1):%Y-%m-%d}/" in left[0]
    with sqlite_registry.session() as s:
        (ev,) = audit.list_events(s, action="retention.purge")
        assert (ev.target, ev.after["deleted"]) == ("prompt_logs", 2)


def test_prompt_log_settings_opt_in_per_model(monkeypatch):
    monkeypatch.setenv("SLIPWAY_PROMPTLOG_MODELS", "demo, other")
    monkeypatch.setenv("SLIPWAY_PROMPTLOG_ENCRYPTION", "kms")
    assert promptlog.PromptLogSettings().models == ["demo", "other"]
    with pytest.raises(PromptLogError, match="SLIPWAY_PROMPTLOG_KMS_KEY_ID is required with encryption=kms"):
        PromptLogger.from_settings(store=open_store("file:///tmp/x"))


def test_no_prompt_pii_or_key_material_appears_in_any_log_line(all_log_lines):
    assert any("botocore" in line or "urllib3" in line for line in all_log_lines)
    leaked = [(s, line[:200]) for line in all_log_lines for s in SENSITIVE if s in line]
    assert leaked == []
