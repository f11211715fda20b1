"""Account keys, and the network layer's retries against a scripted HTTP server on loopback."""

from __future__ import annotations

import base64
import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from acme import messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy.jwa import ES256, ES384, RS256
from josepy.jwk import JWKEC

from renewer.acme_client import (
    AccountKey,
    NewOrderReplacing,
    RateLimitedError,
    RetryingClientNetwork,
    describe_problem,
    problem_code,
)
from renewer.errors import ConfigError, IssuanceError
from renewer.sensitive import Secret


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()


def test_account_key_from_pem_and_base64_of_pem_chooses_the_algorithm() -> None:
    p256 = _pem(ec.generate_private_key(ec.SECP256R1()))
    assert AccountKey.from_pem(Secret(p256)).alg == ES256
    b64 = base64.b64encode(p256.encode()).decode()
    key = AccountKey.from_pem(Secret(b64))
    assert key.alg == ES256
    assert key.to_pem().reveal().startswith("\x2d----BEGIN PRIVATE KEY-----")
    assert AccountKey.from_pem(Secret(_pem(ec.generate_private_key(ec.SECP384R1())))).alg == ES384
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert AccountKey.from_pem(Secret(_pem(rsa_key))).alg == RS256


@pytest.mark.parametrize(
    "text",
    ["not a key", base64.b64encode(b"\x2d----BEGIN PRIVATE KEY-----\nAAAA\n").decode(), ""],
)
def test_bad_account_key_is_a_config_error_without_the_value(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        AccountKey.from_pem(Secret(text))
    assert info.value.field == "ACME_ACCOUNT_KEY"
    if text:
        assert text not in str(info.value)
    assert info.value.__cause__ is None


def test_small_rsa_and_unsupported_curves_are_refused() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigError, match="2048"):
        AccountKey.from_pem(Secret(_pem(small)))
    with pytest.raises(ConfigError):
        AccountKey.from_pem(Secret(_pem(ec.generate_private_key(ec.SECP256K1()))))


def test_account_key_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "account.pem"
    created = AccountKey.from_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = AccountKey.from_file(path)
    assert loaded.jwk.thumbprint() == created.jwk.thumbprint()
    assert isinstance(loaded.jwk, JWKEC)
    # negative control: a fresh key differs
    assert AccountKey.generate().jwk.thumbprint() != created.jwk.thumbprint()
    with pytest.raises(ConfigError):
        AccountKey.from_file(tmp_path / "missing.pem", create=False)


def test_account_key_never_prints_its_value() -> None:
    key = AccountKey.generate()
    secret_line = key.to_pem().reveal().splitlines()[1]
    for text in (repr(key), str(key), f"{key}"):
        assert secret_line not in text
        assert "ES256" in text


def test_new_order_serializes_replaces_only_when_given() -> None:
    ident = messages.Identifier(typ=messages.IDENTIFIER_FQDN, value="smtp.example.com")
    with_it = NewOrderReplacing(identifiers=[ident], replaces="aYhb.AIdl").to_json()
    assert with_it["replaces"] == "aYhb.AIdl"
    without = NewOrderReplacing(identifiers=[ident]).to_json()
    assert "replaces" not in without
    assert "profile" not in without


def test_problem_helpers() -> None:
    error = messages.Error.from_json(
        {
            "type": "urn:ietf:params:acme:error:alreadyReplaced",
            "detail": "serial 1 already has a replacement order",
            "identifier": {"type": "dns", "value": "smtp.example.com"},
        }
    )
    assert problem_code(error) == "alreadyReplaced"  # the library's .code is None for it
    assert describe_problem(error) == (
        "urn:ietf:params:acme:error:alreadyReplaced for smtp.example.com: "
        "serial 1 already has a replacement order"
    )


# -- retries against a scripted server ----------------------------------------------------


@dataclass
class _Script:
    """Replies, in order, for POSTs and GETs: (status, headers, JSON body or None)."""

    replies: list[tuple[int, dict[str, str], object]] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def script() -> Iterator[_Script]:
    state = _Script()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self) -> None:
            state.seen.append(self.command)
            if self.command == "HEAD":
                self.send_response(200)
                self.send_header("Replay-Nonce", "bm9uY2U")
                self.end_headers()
                return
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            status, headers, body = state.replies.pop(0)
            payload = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Replay-Nonce", "bm9uY2Uy")
            ctype = "application/problem+json" if status >= 400 else "application/json"
            self.send_header("Content-Type", ctype)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_HEAD = _reply

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/acme"
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _net(sleeps: list[float], **kwargs: float) -> RetryingClientNetwork:
    key = AccountKey.generate()
    return RetryingClientNetwork(
        key.jwk,
        alg=key.alg,
        sleep=sleeps.append,
        **kwargs,  # type: ignore[arg-type]
    )


Reply = tuple[int, dict[str, str], object]
BAD_NONCE: Reply = (400, {}, {"type": "urn:ietf:params:acme:error:badNonce", "detail": "stale"})
OK: Reply = (200, {}, {"status": "valid"})


@pytest.mark.integration
def test_bad_nonce_is_retried_many_times_reusing_the_error_nonce(script: _Script) -> None:
    script.replies = [BAD_NONCE, BAD_NONCE, BAD_NONCE, BAD_NONCE, OK]
    sleeps: list[float] = []
    net = _net(sleeps)
    response = net.post(script.url, None)
    assert response.json() == {"status": "valid"}
    assert net.bad_nonce_retries == 4
    # one HEAD for the first nonce; every retry used the nonce of the error response
    assert script.seen == ["HEAD", "POST", "POST", "POST", "POST", "POST"]
    assert sleeps == []


@pytest.mark.integration
def test_bad_nonce_retries_are_bounded(script: _Script) -> None:
    script.replies = [BAD_NONCE] * 4
    net = _net([], max_nonce_retries=2)
    with pytest.raises(messages.Error) as info:
        net.post(script.url, None)
    assert problem_code(info.value) == "badNonce"
    assert script.seen.count("POST") == 3


RATE_LIMITED = "urn:ietf:params:acme:error:rateLimited"


@pytest.mark.integration
def test_short_rate_limit_and_503_are_waited_out(script: _Script) -> None:
    script.replies = [
        (429, {"Retry-After": "2"}, {"type": RATE_LIMITED, "detail": "too many new orders"}),
        (503, {"Retry-After": "1"}, None),
        OK,
    ]
    sleeps: list[float] = []
    response = _net(sleeps).post(script.url, None)
    assert response.status_code == 200
    assert sleeps == [2.0, 1.0]


@pytest.mark.integration
def test_long_rate_limit_fails_at_once_with_the_retry_time(script: _Script) -> None:
    script.replies = [
        (429, {"Retry-After": "7200"}, {"type": RATE_LIMITED, "detail": "too many certificates"}),
    ]
    sleeps: list[float] = []
    with pytest.raises(RateLimitedError) as info:
        _net(sleeps).get(script.url)
    assert isinstance(info.value, IssuanceError)
    assert info.value.retry_after == 7200
    assert "too many certificates" in str(info.value)
    assert "7200 s" in str(info.value)
    assert sleeps == []


@pytest.mark.integration
def test_other_problems_are_not_retried(script: _Script) -> None:
    script.replies = [(403, {}, {"type": "urn:ietf:params:acme:error:unauthorized"})]
    sleeps: list[float] = []
    with pytest.raises(messages.Error):
        _net(sleeps).post(script.url, None)
    assert script.seen.count("POST") == 1
    assert sleeps == []


@pytest.mark.integration
def test_409_problem_keeps_its_type(script: _Script) -> None:
    script.replies = [
        (409, {}, {"type": "urn:ietf:params:acme:error:alreadyReplaced", "detail": "done"})
    ]
    with pytest.raises(messages.Error) as info:
        _net([]).post(script.url, None)
    assert problem_code(info.value) == "alreadyReplaced"
