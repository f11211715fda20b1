"""The renewer's own exceptions. Foreign exceptions (requests, dnspython, acme, ssl)
are translated into these at the boundary of each client, with ``raise ... from exc``.

RenewerError
├── ConfigError              bad configuration, environment or usage (exit 2)
└── StepError                a step of the run failed (exit 1); ``step`` names it
    ├── ProbeError           an endpoint could not be read
    ├── ApiError             an HTTP API answered with an error (status, method, URL, body)
    ├── DnsChallengeError    a TXT record could not be created, seen or removed
    ├── IssuanceError        the ACME order failed
    ├── CertificateInvalidError  the issued certificate failed validation (nothing deployed)
    ├── DeployError          a target could not be updated
    ├── VerifyError          an endpoint does not serve the new certificate
    └── NotifyError          the report could not be sent
"""

from __future__ import annotations


class RenewerError(Exception):
    """Root of every error the renewer raises on purpose."""


class ConfigError(RenewerError):
    """Configuration, environment or command line is invalid. ``field`` names what."""

    def __init__(self, field: str, expected: str) -> None:
        self.field = field
        self.expected = expected
        super().__init__(f"{field}: {expected}")


class StepError(RenewerError):
    """A step of the run failed; ``step`` is one of the pipeline's step names."""

    step = "run"


class ProbeError(StepError):
    step = "decide"


class ApiError(StepError):
    """An HTTP API call failed. Never carries request headers or bodies (tokens live there)."""

    step = "api"

    def __init__(
        self,
        service: str,
        method: str,
        url: str,
        status: int | None,
        message: str,
        *,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.service = service
        self.method = method
        self.url = url
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after
        where = f"{method} {url}"
        status_text = f"HTTP {status}" if status is not None else "no response"
        super().__init__(f"{service} API {where}: {status_text}: {message}")


class DnsChallengeError(StepError):
    step = "issue"


class IssuanceError(StepError):
    step = "issue"


class CertificateInvalidError(StepError):
    step = "validate"


class DeployError(StepError):
    step = "deploy"


class VerifyError(StepError):
    step = "verify"


class NotifyError(StepError):
    step = "report"
