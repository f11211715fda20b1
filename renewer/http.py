"""One HTTP session shape for every outside API (Cloudflare, Fly, MailPace).

It owns timeouts, retries and error translation, so each client only knows its API's
paths and error bodies. Retries: 429 (honouring Retry-After), 5xx, timeouts and
connection errors, with exponential backoff. Errors become ``ApiError`` carrying the
status, method, URL and the API's own message, never request headers or bodies.
"""

from __future__ import annotations

import email.utils
import json as json_module
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import requests

from renewer.errors import ApiError

log = logging.getLogger(__name__)

ErrorParser = Callable[[requests.Response], tuple[str, str | None]]

_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_BODY_EXCERPT = 300
_MIN_SECRET_PIECE = 8  # a token piece shorter than this is no credential
_MIN_BODY_SECRET = 64  # request body strings this long (keys, certificates) are redacted
REDACTED = "<redacted>"


def _sensitive_values(auth: Mapping[str, str], body: Any) -> list[str]:
    """What an error body must not repeat: our auth header values (and their pieces, e.g.
    the token after ``FlyV1 ``) and the long strings we sent (a private key in a secrets
    call). Longest first, so a value is replaced before any piece of it."""
    found: set[str] = set()
    for value in auth.values():
        found.add(value)
        found.update(p for p in re.split(r"[\s,]+", value) if len(p) >= _MIN_SECRET_PIECE)

    def walk(item: Any) -> None:
        if isinstance(item, str) and len(item) >= _MIN_BODY_SECRET:
            found.update((item, item.strip('"')))  # TXT content goes quoted
        elif isinstance(item, Mapping):
            for value in item.values():
                walk(value)
        elif isinstance(item, list | tuple):
            for value in item:
                walk(value)

    walk(body)
    return sorted((v for v in found if v), key=len, reverse=True)


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        for form in (secret, json_module.dumps(secret)[1:-1]):
            text = text.replace(form, REDACTED)
    return text


def _redact(response: requests.Response, secrets: list[str]) -> None:
    """Removes ``secrets`` from an error response's body before anything reads it: a proxy
    or debug endpoint that echoes the request would otherwise put our token (or the key
    we sent) into ApiError messages, logs and the report email."""
    if not secrets or not response.content:
        return
    text = response.content.decode(response.encoding or "utf-8", errors="replace")
    cleaned = _scrub(text, secrets)
    if cleaned != text:
        response._content = cleaned.encode("utf-8")
        response.encoding = "utf-8"


def default_error_parser(response: requests.Response) -> tuple[str, str | None]:
    """Falls back to a trimmed body when an API has no known error shape."""
    text = response.text.strip()
    return (text[:_BODY_EXCERPT] or response.reason or "no body"), None


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class ApiSession:
    """A ``requests`` session bound to one API's base URL, auth and error shape."""

    def __init__(
        self,
        service: str,
        base_url: str,
        auth_headers: Callable[[], dict[str, str]],
        *,
        error_parser: ErrorParser = default_error_parser,
        timeout: float = 30.0,
        max_attempts: int = 5,
        max_retry_after: float = 60.0,
        backoff_base: float = 0.25,
        max_backoff: float = 8.0,
        sleep: Callable[[float], None] = time.sleep,
        user_agent: str = "cert-renewer",
    ) -> None:
        self.service = service
        self.base_url = base_url.rstrip("/")
        self._auth_headers = auth_headers
        self._error_parser = error_parser
        self.timeout = timeout
        self.max_attempts = max(1, max_attempts)
        self.max_retry_after = max_retry_after
        self._backoff_base = backoff_base
        self._max_backoff = max_backoff
        self._sleep = sleep
        self._session = requests.Session()
        self._session.headers["User-Agent"] = user_agent
        # Never pick up proxies or netrc credentials from the environment for API calls.
        self._session.trust_env = False

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> ApiSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = True,
        timeout: float | None = None,
    ) -> requests.Response:
        """Sends one request, retrying transient failures; returns a 2xx response."""
        url = self.url(path)
        attempts = self.max_attempts if retry else 1
        for attempt in range(1, attempts + 1):
            all_headers = {**self._auth_headers(), **(headers or {})}
            try:
                response = self._session.request(
                    method,
                    url,
                    params=params,
                    json=json,
                    headers=all_headers,
                    timeout=timeout or self.timeout,
                )
            except (requests.Timeout, requests.ConnectionError) as exc:
                kind = "timed out" if isinstance(exc, requests.Timeout) else "connection failed"
                if attempt >= attempts:
                    raise ApiError(
                        self.service, method, url, None, f"{kind} after {attempt} attempt(s)"
                    ) from None
                delay = self._backoff(attempt)
                log.warning(
                    "%s %s %s %s; retrying in %.1fs", self.service, method, url, kind, delay
                )
                self._sleep(delay)
                continue
            except requests.RequestException as exc:
                # The exception text can hold the URL but never our headers; keep only its type.
                raise ApiError(
                    self.service, method, url, None, f"request failed: {type(exc).__name__}"
                ) from None

            if response.status_code < 400:
                return response
            secrets = _sensitive_values(self._auth_headers(), json)
            _redact(response, secrets)
            message, code = self._parse_error(response)
            message = _scrub(message, secrets)
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            retryable = response.status_code in _RETRY_STATUSES
            if not retryable or attempt >= attempts:
                raise ApiError(
                    self.service,
                    method,
                    url,
                    response.status_code,
                    message,
                    code=code,
                    retry_after=retry_after,
                )
            if retry_after is not None and retry_after > self.max_retry_after:
                raise ApiError(
                    self.service,
                    method,
                    url,
                    response.status_code,
                    f"{message} (asked to retry after {retry_after:.0f}s, "
                    f"more than the {self.max_retry_after:.0f}s we wait)",
                    code=code,
                    retry_after=retry_after,
                )
            delay = retry_after if retry_after is not None else self._backoff(attempt)
            log.warning(
                "%s %s %s: HTTP %s (%s); retrying in %.1fs (attempt %d/%d)",
                self.service,
                method,
                url,
                response.status_code,
                message,
                delay,
                attempt,
                attempts,
            )
            self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _parse_error(self, response: requests.Response) -> tuple[str, str | None]:
        try:
            return self._error_parser(response)
        except ValueError:
            return default_error_parser(response)

    def _backoff(self, attempt: int) -> float:
        # Full jitter keeps several workers from retrying in lockstep.
        ceiling = min(self._max_backoff, self._backoff_base * (2 ** (attempt - 1)))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not crypto
