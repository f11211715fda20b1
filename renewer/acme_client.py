"""A thin extension of the ``acme`` library (5.9), never a fork (cloudflare-mailpace-acme.md D.4).

What the library lacks and we add here:
- ``replaces`` in newOrder (RFC 9773 ARI): ``NewOrderReplacing`` and ``AcmeClient.new_order``;
  an ``alreadyReplaced`` answer (409) is logged and the order sent again without it.
- Bad nonces retried more than once (the library retries once; Pebble at 50 % rejection then
  fails), reusing the fresh nonce that every ACME error response carries (RFC 8555 6.5).
- ``rateLimited`` / HTTP 503 retried after ``Retry-After`` when that is short; a long wait
  fails at once with ``RateLimitedError`` saying when to come back. (The library drops the
  response, and with it ``Retry-After``; we keep it.)
- A 409 with a problem document raises that problem, not a bare ``ConflictError``.
- Accounts found from the key alone (``onlyReturnExisting``) and registered only if none
  exists; the signing algorithm chosen to match the key (ES256 for P-256).
- A test CA trusted through ``verify_ssl=<ca bundle path>`` (setting ``session.verify`` has no
  effect, D.4).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from acme import client as acme_client
from acme import errors as acme_errors
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy.interfaces import JSONDeSerializable
from josepy.json_util import field as jose_field
from josepy.jwa import ES256, ES384, ES512, RS256, JWASignature
from josepy.jwk import JWK, JWKEC, JWKRSA

from renewer.ari import parse_retry_after
from renewer.errors import ConfigError, IssuanceError
from renewer.keys import load_private_key
from renewer.sensitive import Secret

log = logging.getLogger(__name__)

USER_AGENT = "cert-renewer (acme-python)"
MAX_NONCE_RETRIES = 25  # Pebble at 50% rejection fails 10 in a row 1 time in 1024
MAX_RATE_LIMIT_WAIT = 30.0  # seconds we are willing to wait inside one run
MAX_RATE_LIMIT_RETRIES = 3
DEFAULT_RATE_LIMIT_WAIT = 5.0  # 503 without Retry-After


def problem_code(error: messages.Error) -> str:
    """The problem type's last part ("badNonce", "alreadyReplaced"), also for types the
    library does not know (its ``code`` is None for those)."""
    return str(error.typ).rsplit(":", maxsplit=1)[-1]


class RateLimitedError(IssuanceError):
    """The CA asked us to wait longer than we wait inside a run (``retry_after`` seconds)."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


# -- account key ------------------------------------------------------------------------

_ALGS: dict[str, JWASignature] = {
    "secp256r1": ES256,
    "secp384r1": ES384,
    "secp521r1": ES512,
}


class AccountKey:
    """The ACME account's private key and its JWS algorithm. Never printed."""

    __slots__ = ("_key",)

    def __init__(self, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
        if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in _ALGS:
            raise ValueError(f"unsupported curve {key.curve.name}")
        if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 2048:
            raise ValueError("RSA account keys need at least 2048 bits")
        self._key = key

    @classmethod
    def generate(cls) -> AccountKey:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_pem(cls, text: Secret, *, field: str = "ACME_ACCOUNT_KEY") -> AccountKey:
        """PEM text, or base64 of PEM (as Fly secrets hold it). ConfigError naming ``field``."""
        expected = "a PEM private key (EC P-256/P-384/P-521 or RSA >= 2048), or base64 of one"
        key = load_private_key(text, field, expected)
        try:
            return cls(key)
        except ValueError as exc:
            raise ConfigError(field, f"{expected} ({exc})") from None

    @classmethod
    def from_file(cls, path: Path, *, create: bool = True) -> AccountKey:
        """Load a PEM key file; if it is missing and ``create``, make a P-256 key (mode 0600)."""
        if not path.exists() and create:
            key = cls.generate()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(key.to_pem().reveal())
            log.info("Created a new ACME account key in %s", path)
            return key
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(str(path), f"a readable account key file ({exc.strerror})") from exc
        return cls.from_pem(Secret(text), field=str(path))

    def to_pem(self) -> Secret:
        return Secret(
            self._key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode()
        )

    @property
    def jwk(self) -> JWK:
        if isinstance(self._key, rsa.RSAPrivateKey):
            return JWKRSA(key=self._key)
        return JWKEC(key=self._key)

    @property
    def alg(self) -> JWASignature:
        if isinstance(self._key, rsa.RSAPrivateKey):
            return RS256
        return _ALGS[self._key.curve.name]

    def __repr__(self) -> str:
        return f"AccountKey({self.alg.name}, <redacted>)"

    __str__ = __repr__


# -- network: retries --------------------------------------------------------------------


class RetryingClientNetwork(acme_client.ClientNetwork):
    """``ClientNetwork`` that retries bad nonces and short rate limits (see module doc)."""

    def __init__(
        self,
        key: JWK,
        *,
        alg: JWASignature,
        verify_ssl: bool | str = True,
        timeout: int = 30,
        max_nonce_retries: int = MAX_NONCE_RETRIES,
        max_rate_limit_wait: float = MAX_RATE_LIMIT_WAIT,
        max_rate_limit_retries: int = MAX_RATE_LIMIT_RETRIES,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        # verify_ssl is typed bool, but requests takes a CA bundle path there (D.4).
        super().__init__(
            key,
            alg=alg,
            verify_ssl=verify_ssl,  # type: ignore[arg-type]
            user_agent=USER_AGENT,
            timeout=timeout,
        )
        self.max_nonce_retries = max_nonce_retries
        self.max_rate_limit_wait = max_rate_limit_wait
        self.max_rate_limit_retries = max_rate_limit_retries
        self.sleep = sleep
        self.bad_nonce_retries = 0  # counted for tests and the log
        self._local = threading.local()

    def _last_response(self) -> requests.Response | None:
        response: requests.Response | None = getattr(self._local, "response", None)
        return response

    def _check_response(  # type: ignore[override]  # instance method: keeps the response
        self, response: requests.Response, content_type: str | None = None
    ) -> requests.Response:
        self._local.response = response
        if response.status_code == 409:
            # The library raises ConflictError on every 409 before reading the problem,
            # which hides ARI's alreadyReplaced (D.4): raise the problem itself.
            try:
                jobj = response.json()
            except ValueError:
                jobj = None
            if isinstance(jobj, dict) and "type" in jobj:
                raise messages.Error.from_json(jobj)
        checked: requests.Response = super()._check_response(response, content_type=content_type)
        return checked

    def _post_once(
        self,
        url: str,
        obj: JSONDeSerializable,
        content_type: str = acme_client.ClientNetwork.JOSE_CONTENT_TYPE,
        **kwargs: Any,
    ) -> requests.Response:
        new_nonce_url = kwargs.pop("new_nonce_url", None)
        data = self._wrap_in_jws(obj, self._get_nonce(url, new_nonce_url), url)
        kwargs.setdefault("headers", {"Content-Type": content_type})
        response: requests.Response = self._send_request("POST", url, data=data, **kwargs)
        if self.REPLAY_NONCE_HEADER in response.headers:
            # Error responses carry a fresh nonce too: saves a HEAD newNonce on retry.
            self._add_nonce(response)
        return self._check_response(response, content_type=content_type)

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        return self._with_retries("POST", lambda: self._post_once(*args, **kwargs))

    def get(self, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        parent_get = super().get
        return self._with_retries("GET", lambda: parent_get(url, *args, **kwargs))

    def _with_retries(
        self, method: str, send: Callable[[], requests.Response]
    ) -> requests.Response:
        nonce_retries = 0
        rate_retries = 0
        while True:
            self._local.response = None
            try:
                return send()
            except messages.Error as error:
                code = problem_code(error)
                if code == "badNonce" and nonce_retries < self.max_nonce_retries:
                    nonce_retries += 1
                    self.bad_nonce_retries += 1
                    log.debug("ACME badNonce; retrying (%d)", nonce_retries)
                    continue
                if code != "rateLimited" and not self._is_503():
                    raise
                detail = str(error.detail or code)
            except acme_errors.ClientError:
                if not self._is_503():
                    raise
                detail = "HTTP 503 Service Unavailable"
            wait = self._retry_after()
            url = self._url()
            if wait is not None and wait > self.max_rate_limit_wait:
                raise RateLimitedError(
                    f"ACME server rate limit on {method} {url}: {detail}; retry after {wait:.0f} s",
                    wait,
                )
            if rate_retries >= self.max_rate_limit_retries:
                raise RateLimitedError(
                    f"ACME server still refusing {method} {url} after {rate_retries} "
                    f"retries: {detail}",
                    wait,
                )
            rate_retries += 1
            pause = DEFAULT_RATE_LIMIT_WAIT if wait is None else wait
            log.warning("ACME server asks to wait %.1f s (%s); retrying %s", pause, detail, url)
            self.sleep(pause)

    def _is_503(self) -> bool:
        response = self._last_response()
        return response is not None and response.status_code == 503

    def _url(self) -> str:
        response = self._last_response()
        return response.url if response is not None else "?"

    def _retry_after(self) -> float | None:
        response = self._last_response()
        if response is None:
            return None
        return parse_retry_after(
            response.headers.get("Retry-After"), datetime.datetime.now(datetime.UTC)
        )


# -- client ------------------------------------------------------------------------------


class NewOrderReplacing(messages.NewOrder):
    """newOrder with RFC 9773 ``replaces`` (the CertID of the certificate being replaced)."""

    replaces: str | None = jose_field("replaces", omitempty=True)


class OrderReplacing(messages.Order):
    """An order as the server echoes it, ``replaces`` included."""

    replaces: str | None = jose_field("replaces", omitempty=True)


class AcmeClient(acme_client.ClientV2):
    """``ClientV2`` with ``replaces`` and helpers for the directory's offers."""

    net: RetryingClientNetwork
    registered_new_account: bool = False

    @property
    def account_uri(self) -> str:
        account = self.net.account
        return str(account.uri) if account is not None else ""

    @property
    def profiles(self) -> dict[str, str]:
        meta = getattr(self.directory, "meta", None)
        profiles = getattr(meta, "profiles", None) if meta is not None else None
        return dict(profiles or {})

    @property
    def renewal_info_url(self) -> str | None:
        try:
            return str(self.directory["renewalInfo"])
        except KeyError:
            return None

    def fetch_order(self, uri: str) -> tuple[OrderReplacing, requests.Response]:
        """POST-as-GET the order; the response carries Retry-After while processing."""
        response = self._post_as_get(uri)
        return OrderReplacing.from_json(response.json()), response

    def fetch_authorization(self, uri: str) -> messages.AuthorizationResource:
        authzr: messages.AuthorizationResource = self._authzr_from_response(
            self._post_as_get(uri), uri=uri
        )
        return authzr

    def download_certificate(self, url: str) -> str:
        """The PEM chain (leaf first) at the order's certificate URL."""
        response = self._post_as_get(url)
        response.encoding = "utf-8"
        return str(response.text)

    def new_order(
        self,
        csr_pem: bytes,
        profile: str | None = None,
        replaces: str | None = None,
    ) -> messages.OrderResource:
        """Like ``ClientV2.new_order`` plus ``replaces``; sent only when the directory
        advertises ``renewalInfo`` (D.2). When the CA refuses it (``alreadyReplaced``
        or another problem) the order is sent once more without it."""
        if replaces and self.renewal_info_url is None:
            log.info("CA does not advertise renewalInfo; not sending 'replaces'")
            replaces = None
        try:
            return self._new_order(csr_pem, profile, replaces)
        except acme_errors.ConflictError:
            # The library's bare 409 (D.4): on newOrder that can only be alreadyReplaced.
            if not replaces:
                raise
            detail = "already replaced (HTTP 409)"
        except messages.Error as exc:
            # `replaces` only buys the ARI rate-limit exemption: when the CA refuses it
            # (alreadyReplaced; a certificate from another account, lego#3147; a lookup
            # that fails, seen with Pebble), renewing without it beats not renewing.
            if not replaces or problem_code(exc) in ("rateLimited", "badNonce"):
                raise
            code = problem_code(exc)
            detail = "already replaced" if code == "alreadyReplaced" else f"{code}: {exc.detail}"
        log.warning(
            "CA refused 'replaces' %s: %s; ordering without it",
            replaces,
            detail,
        )
        return self._new_order(csr_pem, profile, None)

    def _new_order(
        self, csr_pem: bytes, profile: str | None, replaces: str | None
    ) -> messages.OrderResource:
        # ClientV2.new_order (acme 5.9) with the order message swapped for ours.
        csr = x509.load_pem_x509_csr(csr_pem)
        dns_names = [
            name
            for ext in csr.extensions
            if isinstance(ext.value, x509.SubjectAlternativeName)
            for name in ext.value.get_values_for_type(x509.DNSName)
        ]
        identifiers = [
            messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=name) for name in dns_names
        ]
        order = NewOrderReplacing(
            identifiers=identifiers, profile=profile or None, replaces=replaces
        )
        response = self._post(self.directory["newOrder"], order)
        body = OrderReplacing.from_json(response.json())
        authorizations = [
            self._authzr_from_response(self._post_as_get(url), uri=url)
            for url in body.authorizations
        ]
        return messages.OrderResource(
            body=body,
            uri=response.headers.get("Location"),
            authorizations=authorizations,
            csr_pem=csr_pem,
        )


def open_account(
    directory_url: str,
    key: AccountKey,
    email: str | None,
    ca_bundle: str | Path | None,
    *,
    timeout: int = 30,
    sleep: Callable[[float], None] = time.sleep,
    max_rate_limit_wait: float = MAX_RATE_LIMIT_WAIT,
) -> AcmeClient:
    """Connect to the CA, find the account of ``key`` (``onlyReturnExisting``) and register
    one, agreeing to the terms, only if there is none. Raises IssuanceError."""
    started = time.monotonic()
    net = RetryingClientNetwork(
        key.jwk,
        alg=key.alg,
        verify_ssl=str(ca_bundle) if ca_bundle else True,
        timeout=timeout,
        sleep=sleep,
        max_rate_limit_wait=max_rate_limit_wait,
    )
    try:
        directory = AcmeClient.get_directory(directory_url, net)
        client = AcmeClient(directory, net)
        try:
            client.query_registration(
                messages.RegistrationResource(body=messages.Registration(), uri="")
            )
            log.info("Using existing ACME account %s", client.account_uri)
        except messages.Error as error:
            if problem_code(error) != "accountDoesNotExist":
                raise
            if client.external_account_required():
                raise IssuanceError(
                    f"{directory_url} requires external account binding, "
                    "which cert-renewer does not support"
                ) from None
            registration = messages.NewRegistration.from_data(
                email=email, terms_of_service_agreed=True
            )
            client.new_account(registration)
            client.registered_new_account = True
            log.info("Registered new ACME account %s", client.account_uri)
    except IssuanceError:
        raise
    except Exception as exc:
        raise translate_acme_error(exc, f"ACME account at {directory_url}") from exc
    log.debug("ACME account ready in %.2f s", time.monotonic() - started)
    return client


def translate_acme_error(exc: BaseException, doing: str) -> IssuanceError:
    """One readable IssuanceError for anything the library or requests raised."""
    if isinstance(exc, IssuanceError):
        return exc
    if isinstance(exc, messages.Error):
        return IssuanceError(f"{doing}: {describe_problem(exc)}")
    if isinstance(exc, requests.RequestException):
        return IssuanceError(f"{doing}: cannot reach the ACME server: {type(exc).__name__}")
    if isinstance(exc, acme_errors.Error):
        return IssuanceError(f"{doing}: {type(exc).__name__}: {exc}")
    return IssuanceError(f"{doing}: {type(exc).__name__}: {exc}")


def describe_problem(error: messages.Error) -> str:
    """``<type> for <identifier>: <detail>`` plus subproblems, from a problem document."""
    text = str(error.typ)
    if error.identifier is not None:
        text += f" for {error.identifier.value}"
    if error.detail:
        text += f": {error.detail}"
    for sub in error.subproblems or ():
        text += f"; {describe_problem(sub)}"
    return text
