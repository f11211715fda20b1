"""The MailPace sink answers as cloudflare-mailpace-acme.md section C documents."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from emulators.mailpace_api import MailPaceSink

pytestmark = pytest.mark.integration

TOKEN = "tok-example"
HEADERS = {
    "Accept": "application/json",
    "Content-Type": "application/json",
    "MailPace-Server-Token": TOKEN,
}
GOOD = {
    "from": "Cert Renewer <certs@example.com>",
    "to": "ops@example.com, oncall@example.org",
    "subject": "renewed",
    "textbody": "all good",
    "tags": ["cert-renewer", "success"],
}


@pytest.fixture
def sink() -> Iterator[MailPaceSink]:
    with MailPaceSink({TOKEN: "example.com", "tok-other": "other.net"}) as running:
        yield running


def _send(
    sink: MailPaceSink, body: Any = None, headers: dict[str, str] | None = None, **kw: Any
) -> requests.Response:
    return requests.post(
        f"{sink.base_url}/send",
        json=GOOD if body is None else body,
        headers=HEADERS if headers is None else headers,
        timeout=5,
        **kw,
    )


def test_accepts_a_valid_send_and_records_it(sink: MailPaceSink) -> None:
    assert sink.base_url.endswith("/api/v1")
    response = _send(sink)
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body["id"], int)
    assert body["status"] == "pending"
    [message] = sink.messages
    assert message.id == body["id"]
    assert message.to == ("ops@example.com", "oncall@example.org")
    assert message.tags == ("cert-renewer", "success")
    assert message.textbody == "all good"
    # Negative control: a second send gets a new id and a second message.
    assert _send(sink).json()["id"] != body["id"]
    assert len(sink.messages) == 2


def test_single_tag_string_and_htmlbody_only_are_accepted(sink: MailPaceSink) -> None:
    body = {"from": "certs@example.com", "to": "a@example.com", "htmlbody": "<p>x</p>", "tags": "t"}
    assert _send(sink, body).status_code == 200
    assert sink.messages[0].tags == ("t",)


@pytest.mark.parametrize(
    ("headers", "body", "status", "shape"),
    [
        ({k: v for k, v in HEADERS.items() if k != "MailPace-Server-Token"}, None, 401, "error"),
        ({**HEADERS, "MailPace-Server-Token": "nope"}, None, 400, "error"),
        ({**HEADERS, "Accept": "text/html"}, None, 406, "error"),
        (None, {**GOOD, "from": "not an address"}, 400, "errors"),
        (None, {**GOOD, "from": "certs@other.net"}, 403, "error"),
        (None, {k: v for k, v in GOOD.items() if k != "to"}, 400, "errors"),
        (None, {**GOOD, "to": ",".join(f"u{i}@example.com" for i in range(51))}, 400, "errors"),
        (None, {**GOOD, "to": "not-an-address"}, 400, "errors"),
        (None, {k: v for k, v in GOOD.items() if k != "textbody"}, 400, "errors"),
        (None, {**GOOD, "tags": [1, 2]}, 400, "errors"),
        ({**HEADERS, "Idempotency-Key": "k" * 256}, None, 400, "error"),
    ],
)
def test_rejects_what_the_real_api_rejects(
    sink: MailPaceSink, headers: dict[str, str] | None, body: Any, status: int, shape: str
) -> None:
    response = _send(sink, body, headers)
    assert response.status_code == status
    assert shape in response.json()
    assert sink.messages == []


def test_wrong_content_type_is_406(sink: MailPaceSink) -> None:
    headers = {**HEADERS, "Content-Type": "text/plain"}
    response = requests.post(f"{sink.base_url}/send", data="{}", headers=headers, timeout=5)
    assert response.status_code == 406


def test_fifty_recipients_are_allowed(sink: MailPaceSink) -> None:
    to = ",".join(f"u{i}@example.com" for i in range(50))
    assert _send(sink, {**GOOD, "to": to}).status_code == 200


def test_idempotency_key_replays_the_first_answer_and_sends_nothing(sink: MailPaceSink) -> None:
    headers = {**HEADERS, "Idempotency-Key": "run-1"}
    first = _send(sink, headers=headers)
    again = _send(sink, {**GOOD, "subject": "other"}, headers=headers)
    assert again.status_code == 200
    assert again.json() == first.json()
    assert len(sink.messages) == 1
    # Another key, or the same key under another token, is a new send.
    assert _send(sink, headers={**HEADERS, "Idempotency-Key": "run-2"}).json() != first.json()
    assert len(sink.messages) == 2


def test_a_failed_validation_is_not_stored_under_its_key(sink: MailPaceSink) -> None:
    headers = {**HEADERS, "Idempotency-Key": "run-3"}
    assert _send(sink, {**GOOD, "to": ""}, headers=headers).status_code == 400
    assert _send(sink, headers=headers).status_code == 200
    assert len(sink.messages) == 1


def test_faults_429_and_500_then_recovery(sink: MailPaceSink) -> None:
    sink.inject_fault(429, retry_after=2)
    sink.inject_fault(500)
    limited = _send(sink)
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "2"
    assert limited.json() == {"error": "You are sending emails too quickly"}
    broken = _send(sink)
    assert broken.status_code == 500
    assert broken.content == b""
    assert sink.messages == []
    assert _send(sink).status_code == 200


def test_down_refuses_connections_until_it_comes_up(sink: MailPaceSink) -> None:
    sink.go_down()
    with pytest.raises(requests.ConnectionError):
        _send(sink)
    sink.come_up()
    assert _send(sink).status_code == 200
