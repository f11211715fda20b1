"""ACME Renewal Information (RFC 9773): the CA's suggested renewal window for a certificate.

Facts (cloudflare-mailpace-acme.md D.2): the directory's ``renewalInfo`` URL, an
unauthenticated GET of ``{renewalInfo}/{CertID}``, a ``suggestedWindow`` whose end must be
after its start, an optional ``explanationURL``, and ``Retry-After`` clamped to 1 min ..
1 day (6 h when absent or unreadable).

Errors: ``fetch_renewal_window`` raises ``RenewalInfoError`` (an ``IssuanceError``) for
every failure: transport errors, non-2xx, malformed JSON or an invalid window. It never
returns None. Per RFC 9773 a failed ARI check is not fatal for the run: the caller logs
it, falls back to its expiry-based rule, and may ask again after ``error.retry_after``
seconds (longer for long-term errors, as the RFC recommends).
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import random
from dataclasses import dataclass

import requests
from cryptography import x509

from renewer.errors import IssuanceError

MIN_RETRY_AFTER = 60.0
MAX_RETRY_AFTER = 86400.0
DEFAULT_RETRY_AFTER = 6 * 3600.0
TEMPORARY_ERROR_RETRY = 300.0  # 5xx and timeouts: back off, but far less than 6 h


class RenewalInfoError(IssuanceError):
    """The CA's renewalInfo could not be read; ``retry_after`` seconds until asking again."""

    def __init__(self, message: str, *, retry_after: float = DEFAULT_RETRY_AFTER) -> None:
        self.retry_after = retry_after
        super().__init__(message)


@dataclass(frozen=True)
class RenewalWindow:
    start: datetime.datetime  # timezone-aware UTC
    end: datetime.datetime
    explanation_url: str | None
    retry_after: float  # seconds until the CA wants to be asked again (clamped)

    def is_open(self, now: datetime.datetime) -> bool:
        """The window has started (a window in the past counts: renew now)."""
        return now >= self.start

    def pick_time(self, rng: random.Random | None = None) -> datetime.datetime:
        """RFC 9773 4.2: a uniformly random moment inside the window."""
        span = (self.end - self.start).total_seconds()
        rng = rng or random.Random()  # noqa: S311 - scheduling jitter, not cryptography
        return self.start + datetime.timedelta(seconds=rng.uniform(0, span))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def serial_der_bytes(serial: int) -> bytes:
    """The DER INTEGER contents of a (positive) serial: big-endian, two's complement, so a
    leading 0x00 stays when the high bit is set."""
    return serial.to_bytes(serial.bit_length() // 8 + 1, "big", signed=True)


def cert_id_from_parts(key_identifier: bytes, serial: int) -> str:
    return f"{_b64url(key_identifier)}.{_b64url(serial_der_bytes(serial))}"


def cert_id(cert: x509.Certificate) -> str:
    """RFC 9773 section 4.1 CertID: base64url(AKI keyIdentifier) "." base64url(serial)."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound as exc:
        raise RenewalInfoError(
            "certificate has no Authority Key Identifier; no ARI CertID"
        ) from exc
    if aki.key_identifier is None:
        raise RenewalInfoError("certificate's Authority Key Identifier has no keyIdentifier")
    return cert_id_from_parts(aki.key_identifier, cert.serial_number)


def parse_retry_after(value: str | None, now: datetime.datetime) -> float | None:
    """Seconds from an HTTP Retry-After (delta-seconds or HTTP-date); None if unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max((when - now).total_seconds(), 0.0)


def clamp_retry_after(seconds: float | None) -> float:
    if seconds is None:
        return DEFAULT_RETRY_AFTER
    return min(max(seconds, MIN_RETRY_AFTER), MAX_RETRY_AFTER)


def _parse_time(value: object, field: str) -> datetime.datetime:
    if not isinstance(value, str):
        raise TypeError(f"{field} is not a string")
    when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError(f"{field} has no timezone")
    return when.astimezone(datetime.UTC)


def fetch_renewal_window(
    session: requests.Session,
    renewal_info_url: str,
    cert: x509.Certificate,
    *,
    verify: bool | str = True,
    timeout: float = 10,
    now: datetime.datetime | None = None,
) -> RenewalWindow:
    """GET ``{renewal_info_url}/{cert_id(cert)}`` and return the suggested window.

    ``verify`` is the CA bundle path for a test CA (``acme.ca_bundle``). Raises
    ``RenewalInfoError``; see the module docstring.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc <= now:
        # RFC 9773 4.3: never ask about an expired certificate.
        raise RenewalInfoError("certificate has expired; renewalInfo is not asked")
    url = f"{renewal_info_url.rstrip('/')}/{cert_id(cert)}"
    try:
        response = session.get(
            url, timeout=timeout, verify=verify, headers={"Accept": "application/json"}
        )
    except requests.RequestException as exc:
        temporary = isinstance(exc, requests.Timeout)
        raise RenewalInfoError(
            f"renewalInfo GET {url}: {type(exc).__name__}",
            retry_after=TEMPORARY_ERROR_RETRY if temporary else DEFAULT_RETRY_AFTER,
        ) from exc
    retry_after = clamp_retry_after(parse_retry_after(response.headers.get("Retry-After"), now))
    if response.status_code >= 500:
        raise RenewalInfoError(
            f"renewalInfo GET {url}: HTTP {response.status_code}",
            retry_after=TEMPORARY_ERROR_RETRY,
        )
    if not response.ok:
        raise RenewalInfoError(
            f"renewalInfo GET {url}: HTTP {response.status_code}: {response.text[:200]}"
        )
    try:
        body = response.json()
        window = body["suggestedWindow"]
        start = _parse_time(window["start"], "suggestedWindow.start")
        end = _parse_time(window["end"], "suggestedWindow.end")
        explanation = body.get("explanationURL")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RenewalInfoError(f"renewalInfo {url}: malformed response: {exc}") from exc
    if end <= start:
        raise RenewalInfoError(f"renewalInfo {url}: window end {end} is not after start {start}")
    return RenewalWindow(
        start=start,
        end=end,
        explanation_url=explanation if isinstance(explanation, str) else None,
        retry_after=retry_after,
    )


def directory_renewal_info_url(
    session: requests.Session,
    directory_url: str,
    *,
    verify: bool | str = True,
    timeout: float = 10,
) -> str | None:
    """The directory's ``renewalInfo`` URL, or None when the CA does not offer ARI."""
    try:
        response = session.get(directory_url, timeout=timeout, verify=verify)
        response.raise_for_status()
        url = response.json().get("renewalInfo")
    except (requests.RequestException, ValueError, AttributeError) as exc:
        raise RenewalInfoError(
            f"ACME directory {directory_url}: {type(exc).__name__}: {exc}"
        ) from exc
    return url if isinstance(url, str) and url else None
