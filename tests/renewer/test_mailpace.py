"""MailPaceClient against the MailPace sink: headers, retries, both error shapes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from emulators.mailpace_api import MailPaceSink
from renewer.errors import ApiError, NotifyError
from renewer.mailpace import MailPaceClient
from renewer.sensitive import Secret

pytestmark = pytest.mark.integration

TOKEN = "pm-token-0123456789"


@pytest.fixture
def sink() -> Iterator[MailPaceSink]:
    with MailPaceSink({TOKEN: "example.com"}) as running:
        yield running


def _client(sink: MailPaceSink, sleeps: list[float], token: str = TOKEN) -> MailPaceClient:
    return MailPaceClient(sink.base_url, Secret(token), timeout=5, sleep=sleeps.append)


def _send(client: MailPaceClient, key: str = "key-1", sender: str = "certs@example.com") -> int:
    return client.send(
        sender, ["ops@example.com", "b@example.org"], "renewed: smtp", "body", ["a", "b"], key
    )


def test_send_returns_the_id_and_delivers_what_was_given(sink: MailPaceSink) -> None:
    sleeps: list[float] = []
    message_id = _send(_client(sink, sleeps))
    [message] = sink.messages
    assert message.id == message_id
    assert message.sender == "certs@example.com"
    assert message.to == ("ops@example.com", "b@example.org")
    assert message.subject == "renewed: smtp"
    assert message.tags == ("a", "b")
    assert message.idempotency_key == "key-1"
    assert sleeps == []


def test_429_and_500_are_retried_with_the_same_key_and_send_once(sink: MailPaceSink) -> None:
    sink.inject_fault(429, retry_after=1.5)
    sink.inject_fault(500)
    sleeps: list[float] = []
    message_id = _send(_client(sink, sleeps))
    assert len(sink.messages) == 1
    assert sink.messages[0].id == message_id
    assert sink.requests_seen == 3
    assert sleeps[0] == 1.5  # Retry-After honoured
    assert len(sleeps) == 2


def test_a_replayed_key_does_not_send_twice(sink: MailPaceSink) -> None:
    client = _client(sink, [])
    assert _send(client, "same") == _send(client, "same")
    assert len(sink.messages) == 1
    # Negative control: a new key sends again.
    _send(client, "other")
    assert len(sink.messages) == 2


def test_domain_mismatch_is_a_notify_error_with_the_message(sink: MailPaceSink) -> None:
    with pytest.raises(NotifyError) as info:
        _send(_client(sink, []), sender="certs@elsewhere.net")
    assert "does not match" in str(info.value)
    assert isinstance(info.value.__cause__, ApiError)
    assert info.value.__cause__.status == 403
    assert sink.messages == []


def test_field_errors_are_joined(sink: MailPaceSink) -> None:
    with pytest.raises(NotifyError) as info:
        _send(_client(sink, []), sender="not an address")
    assert "from is invalid" in str(info.value)


def test_bad_token_fails_without_showing_it(sink: MailPaceSink) -> None:
    bad = "wrong-token-secret-value"
    with pytest.raises(NotifyError) as info:
        _send(_client(sink, [], token=bad))
    assert "Invalid API Token" in str(info.value)
    assert bad not in str(info.value)
    assert bad not in repr(info.value.__cause__)


def test_sink_down_fails_after_bounded_retries(sink: MailPaceSink) -> None:
    sink.go_down()
    sleeps: list[float] = []
    with pytest.raises(NotifyError) as info:
        _send(_client(sink, sleeps))
    assert "connection failed" in str(info.value)
    assert len(sleeps) == 4  # five attempts
