"""MailPace send API client (cloudflare-mailpace-acme.md section C).

``POST {api_base_url}/send`` with ``Accept``/``Content-Type: application/json`` and
``MailPace-Server-Token``; an ``Idempotency-Key`` makes retries after 429/5xx or a lost
answer safe (a replay returns the first answer and sends nothing). Errors come as
``{"error": "..."}`` or ``{"errors": {"field": ["..."]}}`` and are joined into one
message, as the official gem does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import requests

from renewer.errors import ApiError, NotifyError
from renewer.http import ApiSession
from renewer.sensitive import Secret

SERVICE = "MailPace"


def parse_mailpace_error(response: requests.Response) -> tuple[str, str | None]:
    """Both documented error shapes -> one message; a 500 has an empty body."""
    if not response.content:
        return (response.reason or "empty body"), None
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300], None
    if isinstance(body, dict):
        if isinstance(body.get("error"), str):
            return body["error"], None
        errors = body.get("errors")
        if isinstance(errors, dict):
            parts = []
            for field, messages in errors.items():
                items = messages if isinstance(messages, list) else [messages]
                parts.append(f"{field} {', '.join(str(m) for m in items)}")
            return "; ".join(parts), None
    return str(body)[:300], None


class MailPaceClient:
    """One MailPace domain token. ``api_base_url`` ends in ``/api/v1``."""

    def __init__(
        self,
        api_base_url: str,
        token: Secret,
        *,
        timeout: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        max_attempts: int = 5,
    ) -> None:
        self._token = token
        self._session = ApiSession(
            SERVICE,
            api_base_url,
            self._auth_headers,
            error_parser=parse_mailpace_error,
            timeout=timeout,
            max_attempts=max_attempts,
            sleep=sleep,
        )

    def _auth_headers(self) -> dict[str, str]:
        return {
            "Accept": "application/json",
            "MailPace-Server-Token": self._token.reveal(),
        }

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> MailPaceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(  # noqa: PLR0917 - the call shape the report step uses
        self,
        sender: str,
        to: Sequence[str],
        subject: str,
        text: str,
        tags: Sequence[str],
        idempotency_key: str,
    ) -> int:
        """Sends one text email; returns MailPace's message id. Raises NotifyError (whose
        cause is the ApiError) when MailPace refuses it or cannot be reached."""
        body = {
            "from": sender,
            "to": ", ".join(to),  # one address or a comma-separated list (doc C)
            "subject": subject,
            "textbody": text,
            "tags": list(tags),
        }
        try:
            response = self._session.request(
                "POST", "send", json=body, headers={"Idempotency-Key": idempotency_key}
            )
        except ApiError as exc:
            raise NotifyError(f"MailPace did not accept the report: {exc}") from exc
        try:
            answer = response.json()
        except ValueError as exc:
            raise NotifyError("MailPace answered 2xx with a body that is not JSON") from exc
        # Check for an integer id, not the status string (doc C).
        message_id = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(message_id, int) or isinstance(message_id, bool):
            raise NotifyError("MailPace answered without an integer message id")
        return message_id
