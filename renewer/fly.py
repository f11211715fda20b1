"""Fly.io Machines API client (plain HTTP, no flyctl): apps, secrets, machines, leases.

Facts and their sources are in fly-api.md; the section is cited where a choice depends
on it. This module has no renewal logic: the fly target (``deploy_fly.py``) and the
provisioning commands both build on it, so its API is kept stable:

- ``authorization_header(token) -> str``
- ``FlyClient(api_base_url, token, *, timeout=30.0, max_attempts=5, sleep=time.sleep)``
  - apps: ``get_app(name) -> FlyApp | None``, ``create_app(name, org_slug) -> FlyApp``,
    ``list_apps(org_slug) -> list[FlyApp]``, ``delete_app(name, *, force=False)``
  - secrets: ``set_secrets(app, values) -> int`` (the new secrets version),
    ``list_secrets(app) -> list[SecretInfo]``
  - machines: ``list_machines``, ``get_machine``, ``create_machine``, ``update_machine``,
    ``delete_machine``, ``start_machine``, ``stop_machine`` (all return/take ``Machine``
    and ``MachineRequest``), ``wait_for_state(...) -> Machine``
  - leases: ``acquire_lease(app, id, ttl) -> nonce``, ``refresh_lease``, ``release_lease``

Every call raises ``ApiError`` (``renewer.errors``) with Fly's own message; a lease held
by someone else raises ``LeaseConflictError`` and a wait that runs out ``WaitTimeoutError``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import requests

from renewer.errors import ApiError
from renewer.http import ApiSession
from renewer.sensitive import Secret

log = logging.getLogger(__name__)

SERVICE = "Fly"
LEASE_NONCE_HEADER = "fly-machine-lease-nonce"
# fly-go's macaroon prefixes (fly-api.md 1.2, superfly/fly-go:tokens/tokens.go).
_MACAROON_PREFIXES = ("fm1r", "fm1a", "fm2")
_SCHEMES = ("FlyV1 ", "Bearer ")
_MAX_SERVER_WAIT = 60  # /wait's documented maximum timeout (fly-api.md 3.1)
_NOT_FOUND_RETRIES = 5  # a 404 right after an update is transient (fly-api.md 4.4)
_APP_VISIBLE_TIMEOUT = 60.0  # flyctl's WaitForApp bound (fly-api.md 2)


@dataclass(frozen=True)
class MachineLease:
    """Someone's lease on a machine (never its nonce: that is the holder's secret)."""

    owner: str
    description: str
    expires_at: float | None  # Unix seconds


class LeaseConflictError(ApiError):
    """Another client holds the machine's lease (HTTP 409)."""


class WaitTimeoutError(ApiError):
    """A machine did not reach the wanted state within the caller's timeout."""


def authorization_header(token: str) -> str:
    """The Authorization value fly-go sends for ``token`` (fly-api.md 1.2): schemes
    stripped (repeatedly), comma-separated pieces split; macaroons (``fm1r_``, ``fm1a_``,
    ``fm2_``) go as ``FlyV1 <m1>,<m2>``, anything else as ``Bearer <token>``."""
    value = token.strip()
    stripped = True
    while stripped:
        stripped = False
        for scheme in _SCHEMES:
            if value.startswith(scheme):
                value = value[len(scheme) :].strip()
                stripped = True
    pieces = [piece.strip() for piece in value.split(",") if piece.strip()]
    macaroons = [p for p in pieces if p.split("_", 1)[0] in _MACAROON_PREFIXES and "_" in p]
    if macaroons:
        return "FlyV1 " + ",".join(macaroons)
    return f"Bearer {value}"


def parse_fly_error(response: requests.Response) -> tuple[str, str | None]:
    """``{"error", "status", "message"}`` (fly-api.md 6): ``message`` is preferred, as
    fly-go does; ``status`` is the machine-readable code (e.g. ``name_taken``)."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()[:300]
        return (text or response.reason or "no body"), None
    if not isinstance(body, dict):
        return str(body)[:300], None
    message = body.get("message") or body.get("error") or response.reason or "no message"
    code = body.get("status")
    return str(message), (str(code) if isinstance(code, str) and code else None)


@dataclass(frozen=True)
class FlyApp:
    id: str
    name: str
    status: str | None
    org_slug: str | None
    internal_numeric_id: int | None

    @classmethod
    def from_json(cls, body: Mapping[str, Any], *, name: str | None = None) -> FlyApp:
        org = body.get("organization") or {}
        numeric = body.get("internal_numeric_id")
        return cls(
            id=str(body.get("id", "")),
            name=str(body.get("name") or name or ""),
            status=body.get("status"),
            org_slug=org.get("slug") if isinstance(org, dict) else None,
            internal_numeric_id=numeric if isinstance(numeric, int) else None,
        )


@dataclass(frozen=True)
class SecretInfo:
    """A secret as the API lists it: never a value, only a digest (fly-api.md 4.2)."""

    name: str
    digest: str | None
    updated_at: str | None


@dataclass(frozen=True)
class MachineCheck:
    name: str
    status: str  # passing | warning | critical
    output: str


@dataclass(frozen=True)
class MachineEvent:
    type: str
    status: str
    timestamp: int
    exit_code: int | None
    restarting: bool


@dataclass(frozen=True)
class Machine:
    """A machine. ``config`` is the raw MachineConfig dict, to be sent back verbatim in
    an update (updates need the full config, fly-api.md 3.2); do not mutate it in place."""

    id: str
    name: str
    state: str
    region: str
    instance_id: str
    config: Mapping[str, Any]
    checks: tuple[MachineCheck, ...]
    events: tuple[MachineEvent, ...]  # newest first, as the API lists them
    nonce: str | None  # only on create with lease_ttl

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Machine:
        events = []
        for event in body.get("events") or []:
            request = event.get("request")
            exit_event = (request.get("exit_event") if isinstance(request, dict) else None) or {}
            code = exit_event.get("exit_code")
            events.append(
                MachineEvent(
                    type=str(event.get("type", "")),
                    status=str(event.get("status", "")),
                    timestamp=int(event.get("timestamp") or 0),
                    exit_code=code if isinstance(code, int) else None,
                    restarting=bool(exit_event.get("restarting")),
                )
            )
        checks = tuple(
            MachineCheck(str(c.get("name", "")), str(c.get("status", "")), str(c.get("output", "")))
            for c in body.get("checks") or []
        )
        config = body.get("config")
        return cls(
            id=str(body["id"]),
            name=str(body.get("name", "")),
            state=str(body.get("state", "")),
            region=str(body.get("region", "")),
            instance_id=str(body.get("instance_id", "")),
            config=config if isinstance(config, dict) else {},
            checks=checks,
            events=tuple(events),
            nonce=body.get("nonce"),
        )


class MachineRequest(TypedDict, total=False):
    """Create/update body (fly-api.md 3.2). ``config`` must be the full config."""

    config: Mapping[str, Any]
    region: str
    name: str
    skip_launch: bool
    skip_service_registration: bool
    min_secrets_version: int
    lease_ttl: int
    current_version: str


class FlyClient:
    """One Fly Machines API endpoint and token. ``api_base_url`` has no ``/v1``."""

    def __init__(
        self,
        api_base_url: str,
        token: Secret,
        *,
        timeout: float = 30.0,
        max_attempts: int = 5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._token = token
        self._timeout = timeout
        self._sleep = sleep
        self._session = ApiSession(
            SERVICE,
            api_base_url.rstrip("/") + "/v1",
            self._auth_headers,
            error_parser=parse_fly_error,
            timeout=timeout,
            max_attempts=max_attempts,
            sleep=sleep,
        )

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": authorization_header(self._token.reveal())}

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> FlyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _json(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        nonce: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        headers = {LEASE_NONCE_HEADER: nonce} if nonce else None
        response = self._session.request(
            method, path, params=params, json=json, headers=headers, timeout=timeout
        )
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise ApiError(
                SERVICE, method, self._session.url(path), response.status_code, "body is not JSON"
            ) from exc

    # -- apps ------------------------------------------------------------------------------

    def get_app(self, name: str) -> FlyApp | None:
        """The app, or None when the name is free (404). A name held by another
        organisation answers 403, raised as ApiError (fly-api.md 2)."""
        try:
            body = self._json("GET", f"apps/{name}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return FlyApp.from_json(body, name=name)

    def create_app(self, name: str, org_slug: str) -> FlyApp:
        """Creates the app (201), then waits until GET sees it, as flyctl does
        (fly-api.md 2). A taken name raises ApiError with ``code == "name_taken"``."""
        body = self._json("POST", "apps", json={"name": name, "org_slug": org_slug})
        deadline = time.monotonic() + _APP_VISIBLE_TIMEOUT
        delay = 0.1
        while True:
            try:
                app = self.get_app(name)
            except ApiError as exc:
                if exc.status != 401:
                    raise
                app = None
            if app is not None:
                return app
            if time.monotonic() >= deadline:
                return FlyApp.from_json(body or {}, name=name)
            self._sleep(delay)
            delay = min(delay * 2, 5.0)

    def list_apps(self, org_slug: str) -> list[FlyApp]:
        body = self._json("GET", "apps", params={"org_slug": org_slug})
        return [FlyApp.from_json(app) for app in (body or {}).get("apps") or []]

    def delete_app(self, name: str, *, force: bool = False) -> None:
        """Deletes the app (202). ``force`` stops and deletes its machines at once."""
        self._json("DELETE", f"apps/{name}", params={"force": "true"} if force else None)

    # -- secrets ---------------------------------------------------------------------------

    def set_secrets(self, app: str, values: Mapping[str, Secret | None]) -> int:
        """Sets (and, for None, unsets) secrets in ONE call; returns the app's new secrets
        version, to pass as ``min_secrets_version`` (fly-api.md 4.1-4.2). ``version`` is
        read, with the deprecated ``Version`` as fallback."""
        payload = {name: (v.reveal() if v is not None else None) for name, v in values.items()}
        body = self._json("POST", f"apps/{app}/secrets", json={"values": payload})
        version = body.get("version") if isinstance(body, dict) else None
        if version is None and isinstance(body, dict):
            version = body.get("Version")
        if not isinstance(version, int):
            raise ApiError(
                SERVICE,
                "POST",
                self._session.url(f"apps/{app}/secrets"),
                200,
                "answer has no integer secrets version",
            )
        return version

    def list_secrets(self, app: str) -> list[SecretInfo]:
        body = self._json("GET", f"apps/{app}/secrets")
        return [
            SecretInfo(str(s.get("name", "")), s.get("digest"), s.get("updated_at"))
            for s in (body or {}).get("secrets") or []
        ]

    # -- machines --------------------------------------------------------------------------

    def list_machines(self, app: str, *, include_deleted: bool = False) -> list[Machine]:
        params = {"include_deleted": "true"} if include_deleted else None
        body = self._json("GET", f"apps/{app}/machines", params=params)
        return [Machine.from_json(m) for m in body or []]

    def get_machine(self, app: str, machine_id: str) -> Machine:
        return Machine.from_json(self._json("GET", f"apps/{app}/machines/{machine_id}"))

    def create_machine(self, app: str, request: MachineRequest) -> Machine:
        return Machine.from_json(self._json("POST", f"apps/{app}/machines", json=dict(request)))

    def update_machine(
        self, app: str, machine_id: str, request: MachineRequest, lease_nonce: str | None
    ) -> Machine:
        """POSTs the full request; the returned machine carries the new ``instance_id``."""
        body = self._json(
            "POST", f"apps/{app}/machines/{machine_id}", json=dict(request), nonce=lease_nonce
        )
        return Machine.from_json(body)

    def delete_machine(
        self, app: str, machine_id: str, *, force: bool = False, lease_nonce: str | None = None
    ) -> None:
        # The spec and docs say ?force=true, fly-go sends ?kill=true (fly-api.md 3.1): send both.
        params = {"force": "true", "kill": "true"} if force else None
        self._json("DELETE", f"apps/{app}/machines/{machine_id}", params=params, nonce=lease_nonce)

    def start_machine(self, app: str, machine_id: str, *, lease_nonce: str | None = None) -> None:
        self._json("POST", f"apps/{app}/machines/{machine_id}/start", nonce=lease_nonce)

    def stop_machine(self, app: str, machine_id: str, *, lease_nonce: str | None = None) -> None:
        self._json("POST", f"apps/{app}/machines/{machine_id}/stop", nonce=lease_nonce)

    def wait_for_state(
        self,
        app: str,
        machine_id: str,
        state: str | Sequence[str],
        *,
        version: str | None = None,
        timeout: float,
    ) -> Machine:
        """Waits until the machine is in ``state`` (and at ``version`` = instance_id, when
        given), looping server-side waits of at most 60 s (fly-api.md 3.1); 408 means
        "not yet", a 404 right after an update is retried a few times. Returns the machine;
        raises WaitTimeoutError when ``timeout`` seconds pass."""
        states = [state] if isinstance(state, str) else list(state)
        deadline = time.monotonic() + timeout
        not_found = 0
        path = f"apps/{app}/machines/{machine_id}/wait"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeoutError(
                    SERVICE,
                    "GET",
                    self._session.url(path),
                    408,
                    f"machine {machine_id} did not reach {'/'.join(states)} within {timeout:g}s",
                )
            chunk = max(1, min(_MAX_SERVER_WAIT, math.ceil(left)))
            params: dict[str, Any] = {"state": ",".join(states), "timeout": chunk}
            if version:
                params["version"] = version
            try:
                self._json("GET", path, params=params, timeout=chunk + self._timeout)
            except ApiError as exc:
                if exc.status == 408:
                    continue
                if exc.status == 404 and not_found < _NOT_FOUND_RETRIES:
                    not_found += 1
                    self._sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                    continue
                raise
            return self.get_machine(app, machine_id)

    # -- leases ----------------------------------------------------------------------------

    def acquire_lease(
        self, app: str, machine_id: str, ttl: int, *, description: str = "cert-renewer"
    ) -> str:
        """Takes the machine's lease for ``ttl`` seconds; returns its nonce (201).
        Raises LeaseConflictError (409) when someone else holds it. The TTL goes in the
        body (docs/spec) and the query (fly-go) so either reading works (fly-api.md 3.1)."""
        return self._lease_post(app, machine_id, ttl, description, None)

    def refresh_lease(self, app: str, machine_id: str, nonce: str, ttl: int) -> None:
        """Extends a lease we hold (POST with our nonce in the header)."""
        self._lease_post(app, machine_id, ttl, "cert-renewer", nonce)

    def _lease_post(
        self, app: str, machine_id: str, ttl: int, description: str, nonce: str | None
    ) -> str:
        try:
            body = self._json(
                "POST",
                f"apps/{app}/machines/{machine_id}/lease",
                params={"ttl": int(ttl)},
                json={"ttl": int(ttl), "description": description},
                nonce=nonce,
            )
        except ApiError as exc:
            if exc.status == 409:
                raise LeaseConflictError(
                    exc.service, exc.method, exc.url, exc.status, exc.message, code=exc.code
                ) from exc
            raise
        data = body.get("data") if isinstance(body, dict) else None
        found = (data or {}).get("nonce") or (body or {}).get("nonce")
        if not isinstance(found, str) or not found:
            raise ApiError(
                SERVICE,
                "POST",
                self._session.url(f"apps/{app}/machines/{machine_id}/lease"),
                201,
                "lease answer has no nonce",
            )
        return found

    def get_lease(self, app: str, machine_id: str) -> MachineLease | None:
        """The machine's current lease, or None when it has none (404)."""
        try:
            body = self._json("GET", f"apps/{app}/machines/{machine_id}/lease")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        data = (body.get("data") if isinstance(body, dict) else None) or body or {}
        expires = data.get("expires_at")
        return MachineLease(
            owner=str(data.get("owner") or ""),
            description=str(data.get("description") or ""),
            expires_at=float(expires) if isinstance(expires, int | float) else None,
        )

    def release_lease(self, app: str, machine_id: str, nonce: str) -> None:
        """Releases our lease; a lease that already expired (404) is not an error."""
        try:
            self._json("DELETE", f"apps/{app}/machines/{machine_id}/lease", nonce=nonce)
        except ApiError as exc:
            if exc.status != 404:
                raise
            log.debug("lease on machine %s of %s had already expired", machine_id, app)
