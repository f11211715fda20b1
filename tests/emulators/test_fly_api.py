"""The Fly emulator follows fly-api.md's checklist (section 8) with raw HTTP requests."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme
from cryptography import x509

from emulators.fly_api import FlyApi, MachineSpec
from renewer.certs import fingerprint_sha256
from renewer.errors import ProbeError
from renewer.probe import Endpoint, probe_endpoint

pytestmark = pytest.mark.integration

ORG = "fm2_orgtoken"
ONLY_A = "fm2_deploy_a"
ONLY_B = "fm2_deploy_b"
OAUTH = "oauth-user-token"
SNI = "smtp.example.com"


def _pems(ca: trustme.CA) -> tuple[str, str, str]:
    cert = ca.issue_cert(SNI)
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    leaf = x509.load_pem_x509_certificate(chain)
    return (
        base64.b64encode(cert.private_key_pem.bytes()).decode(),
        base64.b64encode(chain).decode(),
        fingerprint_sha256(leaf),
    )


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FlyApi]:
    tokens = {ORG: None, OAUTH: None, ONLY_A: frozenset({"app-a"}), ONLY_B: frozenset({"app-b"})}
    with FlyApi(tmp_path / "fly", tokens=tokens) as running:
        yield running


def _call(
    api: FlyApi, method: str, path: str, token: str | None = f"FlyV1 {ORG}", **kw: Any
) -> requests.Response:
    headers = dict(kw.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = token
    return requests.request(method, api.base_url + path, headers=headers, timeout=70, **kw)


def test_apps_create_get_list_delete(api: FlyApi) -> None:
    created = _call(api, "POST", "/v1/apps", json={"name": "app-a", "org_slug": "personal"})
    assert created.status_code == 201
    assert set(created.json()) == {"id", "created_at"}
    # The prose docs' field name is accepted too.
    assert (
        _call(
            api, "POST", "/v1/apps", json={"app_name": "app-b", "org_slug": "personal"}
        ).status_code
        == 201
    )
    taken = _call(api, "POST", "/v1/apps", json={"name": "app-a", "org_slug": "personal"})
    assert taken.status_code == 422
    assert taken.json()["status"] == "name_taken"
    got = _call(api, "GET", "/v1/apps/app-a").json()
    assert got["name"] == "app-a"
    assert got["organization"]["slug"] == "personal"
    assert got["status"] == "pending"
    listed = _call(api, "GET", "/v1/apps", params={"org_slug": "personal"}).json()
    assert listed["total_apps"] == 2
    assert _call(api, "GET", "/v1/apps/nope").status_code == 404
    assert _call(api, "GET", "/v1/apps/nope").json() == {
        "error": "app not found",
        "status": "unknown",
    }
    deleted = _call(api, "DELETE", "/v1/apps/app-a")
    assert deleted.status_code == 202
    assert deleted.content == b""
    assert _call(api, "GET", "/v1/apps/app-a").status_code == 404


def test_foreign_app_is_403_and_taken(api: FlyApi) -> None:
    api.add_foreign_app("theirs")
    assert _call(api, "GET", "/v1/apps/theirs").status_code == 403
    taken = _call(api, "POST", "/v1/apps", json={"name": "theirs", "org_slug": "personal"})
    assert taken.json()["status"] == "name_taken"


def test_auth_forms_and_scopes(api: FlyApi) -> None:
    api.add_app("app-a")
    api.add_app("app-b")
    assert _call(api, "GET", "/v1/apps/app-a", token=None).status_code == 401
    assert _call(api, "GET", "/v1/apps/app-a", token="Bearer unknown").status_code == 401
    assert _call(api, "GET", "/v1/apps/app-a", token=f"Bearer {OAUTH}").status_code == 200
    assert _call(api, "GET", "/v1/apps/app-a", token=f"FlyV1 {ONLY_A}").status_code == 200
    # A token for app A cannot touch app B, nor create apps.
    denied = _call(api, "GET", "/v1/apps/app-b", token=f"FlyV1 {ONLY_A}")
    assert denied.status_code == 403
    assert set(denied.json()) == {"error", "status"}
    new_app = {"name": "app-c", "org_slug": "personal"}
    assert _call(api, "POST", "/v1/apps", token=f"FlyV1 {ONLY_A}", json=new_app).status_code == 403
    # Several macaroons in one header: any piece may allow.
    both = f"FlyV1 {ONLY_A},{ONLY_B}"
    assert _call(api, "GET", "/v1/apps/app-b", token=both).status_code == 200
    listed = _call(api, "GET", "/v1/apps", token=f"FlyV1 {ONLY_A}").json()
    assert [a["name"] for a in listed["apps"]] == ["app-a"]
    assert all(entry.auth_scheme in {None, "FlyV1", "Bearer"} for entry in api.request_log)


def test_secrets_are_versioned_and_never_listed_with_values(api: FlyApi) -> None:
    api.add_app("app-a")
    first = _call(api, "POST", "/v1/apps/app-a/secrets", json={"values": {"A": "1", "B": "2"}})
    assert first.status_code == 200
    assert first.json()["version"] == first.json()["Version"] == 1
    second = _call(api, "POST", "/v1/apps/app-a/secrets", json={"values": {"A": None, "C": "3"}})
    assert second.json()["version"] == 2
    listed = _call(api, "GET", "/v1/apps/app-a/secrets").json()["secrets"]
    assert [s["name"] for s in listed] == ["B", "C"]
    assert all("value" not in s and s["digest"] for s in listed)
    assert api.secrets_calls("app-a") == 2
    assert api.secret_value("app-a", "C") == "3"
    single = _call(api, "POST", "/v1/apps/app-a/secrets/D", json={"value": "4"})
    assert single.status_code == 201
    assert single.json()["version"] == 3
    bad = _call(api, "POST", "/v1/apps/app-a/secrets", json={"values": {"A": 5}})
    assert bad.status_code == 400
    assert api.secrets_version("app-a") == 3


def test_update_boots_the_machine_with_new_secrets(api: FlyApi, tmp_path: Path) -> None:
    ca = trustme.CA()
    key, chain, fingerprint = _pems(ca)
    [machine_id] = api.add_app("app-a", [MachineSpec(listen=("587/starttls", "465/tls"))])
    assert api.wait_until(lambda: api.machine("app-a", machine_id).state == "started")
    before = api.machine("app-a", machine_id)
    served = probe_endpoint(Endpoint.parse(f"127.0.0.1:{before.host_ports[587]}/starttls"), SNI)
    assert fingerprint_sha256(served.leaf) != fingerprint  # placeholder until updated

    version = _call(
        api,
        "POST",
        "/v1/apps/app-a/secrets",
        json={"values": {"PRIVATEKEY": key, "FULLCHAIN": chain}},
    ).json()["version"]
    config = _call(api, "GET", f"/v1/apps/app-a/machines/{machine_id}").json()["config"]
    too_new = _call(
        api,
        "POST",
        f"/v1/apps/app-a/machines/{machine_id}",
        json={"config": config, "min_secrets_version": version + 1},
    )
    assert too_new.status_code == 412
    assert "min_secrets_version" in too_new.json()["error"]
    moved = _call(
        api,
        "POST",
        f"/v1/apps/app-a/machines/{machine_id}",
        json={"config": config, "region": "ams"},
    )
    assert moved.status_code == 400
    updated = _call(
        api,
        "POST",
        f"/v1/apps/app-a/machines/{machine_id}",
        json={"config": config, "min_secrets_version": version},
    ).json()
    assert updated["instance_id"] != before.instance_id
    waited = _call(
        api,
        "GET",
        f"/v1/apps/app-a/machines/{machine_id}/wait",
        params={"state": "started", "timeout": 10, "version": updated["instance_id"]},
    )
    assert waited.status_code == 200
    assert waited.json()["version"] == updated["instance_id"]
    after = api.machine("app-a", machine_id)
    assert after.booted_secrets_version == version
    for port, mode in ((587, "starttls"), (465, "tls")):
        endpoint = Endpoint.parse(f"127.0.0.1:{after.host_ports[port]}/{mode}")
        assert fingerprint_sha256(probe_endpoint(endpoint, SNI).leaf) == fingerprint
    events = _call(api, "GET", f"/v1/apps/app-a/machines/{machine_id}").json()["events"]
    assert [e["type"] for e in events[:2]] == ["start", "update"]


def test_wait_times_out_with_408_and_bounds_the_timeout(api: FlyApi) -> None:
    [machine_id] = api.add_app("app-a", [MachineSpec(state="stopped")])
    timed_out = _call(
        api,
        "GET",
        f"/v1/apps/app-a/machines/{machine_id}/wait",
        params={"state": "started", "timeout": 1},
    )
    assert timed_out.status_code == 408
    assert "currently stopped" in timed_out.json()["error"]
    too_long = _call(
        api, "GET", f"/v1/apps/app-a/machines/{machine_id}/wait", params={"timeout": 61}
    )
    assert too_long.status_code == 400
    stopped = _call(
        api,
        "GET",
        f"/v1/apps/app-a/machines/{machine_id}/wait",
        params={"state": "stopped", "timeout": 1},
    )
    assert stopped.status_code == 200


def test_leases(api: FlyApi) -> None:
    [machine_id] = api.add_app("app-a", [MachineSpec(state="stopped")])
    base = f"/v1/apps/app-a/machines/{machine_id}"
    lease = _call(api, "POST", f"{base}/lease", json={"ttl": 30})
    assert lease.status_code == 201
    nonce = lease.json()["data"]["nonce"]
    assert _call(api, "POST", f"{base}/lease", params={"ttl": 30}).status_code == 409
    config = _call(api, "GET", base).json()["config"]
    assert _call(api, "POST", base, json={"config": config}).status_code == 409
    wrong = {"fly-machine-lease-nonce": "wrong"}
    assert _call(api, "POST", base, json={"config": config}, headers=wrong).status_code == 409
    ok = _call(
        api,
        "POST",
        base,
        json={"config": config, "skip_launch": True},
        headers={"fly-machine-lease-nonce": nonce},
    )
    assert ok.status_code == 200
    assert ok.json()["state"] == "created"  # skip_launch keeps it down
    assert _call(api, "DELETE", f"{base}/lease").status_code == 400
    assert _call(api, "DELETE", f"{base}/lease", headers=wrong).status_code == 409
    assert (
        _call(
            api, "DELETE", f"{base}/lease", headers={"fly-machine-lease-nonce": nonce}
        ).status_code
        == 200
    )
    assert _call(api, "GET", f"{base}/lease").status_code == 404
    assert _call(api, "POST", base, json={"config": config, "skip_launch": True}).status_code == 200
    assert api.machine("app-a", machine_id).pid is None


def test_fault_injection_and_request_log(api: FlyApi) -> None:
    api.add_app("app-a")
    api.inject_fault("GET", r"/apps/app-a$", 429, times=1, retry_after=3)
    limited = _call(api, "GET", "/v1/apps/app-a")
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "3"
    assert set(limited.json()) == {"error", "status"}
    assert _call(api, "GET", "/v1/apps/app-a").status_code == 200
    assert [e.status for e in api.request_log] == [429, 200]
    assert ORG not in repr(api.request_log)


def test_checks_crash_loop_and_never_starts(api: FlyApi) -> None:
    ids = api.add_app("app-a", [MachineSpec(), MachineSpec(), MachineSpec()])
    assert api.wait_until(
        lambda: (
            all(
                c["status"] == "passing"
                for c in _call(api, "GET", f"/v1/apps/app-a/machines/{ids[0]}").json()["checks"]
            )
            and bool(_call(api, "GET", f"/v1/apps/app-a/machines/{ids[0]}").json()["checks"])
        )
    )
    api.machine_fails_checks("app-a", ids[1])
    assert api.wait_until(
        lambda: (
            [
                c["status"]
                for c in _call(api, "GET", f"/v1/apps/app-a/machines/{ids[1]}").json()["checks"]
            ]
            == ["critical"]
        )
    )
    api.crash_loop("app-a", ids[2])
    _call(api, "POST", f"/v1/apps/app-a/machines/{ids[2]}/stop")
    _call(api, "POST", f"/v1/apps/app-a/machines/{ids[2]}/start")
    assert api.wait_until(lambda: api.machine("app-a", ids[2]).restart_count >= 1)
    events = _call(api, "GET", f"/v1/apps/app-a/machines/{ids[2]}/events").json()
    exits = [e for e in events if e["type"] == "exit"]
    assert exits[0]["request"]["exit_event"]["exit_code"] == 1
    assert exits[0]["request"]["exit_event"]["restarting"] is True
    api.clear_faults()
    api.machine_never_starts("app-a", ids[0])
    _call(api, "POST", f"/v1/apps/app-a/machines/{ids[0]}/stop")
    _call(api, "POST", f"/v1/apps/app-a/machines/{ids[0]}/start")
    timed_out = _call(
        api,
        "GET",
        f"/v1/apps/app-a/machines/{ids[0]}/wait",
        params={"state": "started", "timeout": 1},
    )
    assert timed_out.status_code == 408
    assert api.machine("app-a", ids[0]).state == "starting"


def test_front_port_spreads_over_started_machines(api: FlyApi) -> None:
    ids = api.add_app("app-a", [MachineSpec(listen=("25/starttls",)) for _ in range(2)])
    assert api.wait_until(lambda: all(api.machine("app-a", i).state == "started" for i in ids))
    port = api.front_port("app-a", 25)
    assert api.front_port("app-a", 25) == port
    seen = {
        fingerprint_sha256(probe_endpoint(Endpoint.parse(f"127.0.0.1:{port}/starttls"), SNI).leaf)
        for _ in range(4)
    }
    assert len(seen) == 2  # each machine has its own placeholder certificate
    _call(api, "POST", f"/v1/apps/app-a/machines/{ids[0]}/stop")
    _call(api, "POST", f"/v1/apps/app-a/machines/{ids[1]}/stop")
    with pytest.raises(ProbeError):  # no started backend: the proxy closes at once
        probe_endpoint(Endpoint.parse(f"127.0.0.1:{port}/starttls"), SNI, timeout=2)


def test_scheduled_machine_runs_on_tick(api: FlyApi) -> None:
    api.add_app("renewer")
    created = _call(
        api,
        "POST",
        "/v1/apps/renewer/machines",
        json={
            "region": "cdg",
            "config": {
                "image": "registry.fly.io/renewer:v1",
                "schedule": "weekly",
                "restart": {"policy": "no"},
            },
        },
    ).json()
    machine_id = created["id"]
    assert created["config"]["schedule"] == "weekly"
    # The job runs at creation, exits 0, and the machine stops (restart policy "no").
    assert api.wait_until(lambda: api.machine("renewer", machine_id).state == "stopped")
    assert api.tick("renewer") == [machine_id]
    assert api.machine("renewer", machine_id).state in {"starting", "started"}
    assert api.wait_until(lambda: api.machine("renewer", machine_id).state == "stopped")
    assert api.tick("renewer") == [machine_id]
