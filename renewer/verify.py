"""After deployment: every endpoint must serve the new certificate, within a bounded time."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from renewer.certs import fingerprint_sha256
from renewer.errors import ProbeError, VerifyError
from renewer.probe import Endpoint, ServedCertificate, probe_endpoint

log = logging.getLogger(__name__)


class EndpointsNotServingError(VerifyError):
    """Some endpoints did not serve the new certificate in time; ``results`` has them all."""

    def __init__(self, message: str, results: list[VerifyResult]) -> None:
        super().__init__(message)
        self.results = results


@dataclass(frozen=True)
class VerifyResult:
    endpoint: Endpoint
    served: ServedCertificate | None
    matches: bool
    detail: str
    seconds: float


def _verify_one(
    endpoint: Endpoint,
    sni: str,
    fingerprint: str,
    *,
    timeout: float,
    probe_timeout: float,
    confirmations: int,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> VerifyResult:
    start = clock()
    deadline = start + timeout
    interval = 0.1
    last: ServedCertificate | None = None
    detail = "not probed"
    matched = 0
    while True:
        try:
            last = probe_endpoint(
                endpoint, sni, timeout=min(probe_timeout, max(1.0, deadline - clock()))
            )
            if fingerprint_sha256(last.leaf) == fingerprint:
                matched += 1
                if matched >= confirmations:
                    detail = "serves the new certificate"
                    return VerifyResult(endpoint, last, True, detail, clock() - start)
                continue  # a new connection may reach another machine behind the proxy
            matched = 0
            detail = f"still serves {fingerprint_sha256(last.leaf)[:16]}..."
        except ProbeError as exc:
            matched = 0
            detail = str(exc)
        if clock() + interval > deadline:
            return VerifyResult(endpoint, last, False, detail, clock() - start)
        sleep(interval)
        # Machines restart one at a time; probing faster than a restart takes is waste.
        interval = min(interval * 1.5, 2.0)


def verify_endpoints(
    endpoints: Sequence[Endpoint],
    sni: str,
    fingerprint: str,
    *,
    timeout: float,
    probe_timeout: float = 10.0,
    confirmations: int = 3,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[VerifyResult]:
    """Probes every endpoint (in parallel) until it serves ``fingerprint``; raises VerifyError
    listing the endpoints that did not within ``timeout`` seconds."""
    if not endpoints:
        return []
    with ThreadPoolExecutor(
        max_workers=min(8, len(endpoints)), thread_name_prefix=threading.current_thread().name
    ) as pool:
        results = list(
            pool.map(
                lambda ep: _verify_one(
                    ep,
                    sni,
                    fingerprint,
                    timeout=timeout,
                    probe_timeout=probe_timeout,
                    confirmations=confirmations,
                    clock=clock,
                    sleep=sleep,
                ),
                endpoints,
            )
        )
    for result in results:
        log.info("verify %s: %s (%.1fs)", result.endpoint, result.detail, result.seconds)
    failed = [r for r in results if not r.matches]
    if failed:
        listing = "; ".join(f"{r.endpoint}: {r.detail}" for r in failed)
        raise EndpointsNotServingError(
            f"{len(failed)} endpoint(s) do not serve the new certificate: {listing}", results
        )
    return results
