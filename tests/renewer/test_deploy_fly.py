"""The fly target rolls a certificate across real SMTP machines in the Fly emulator."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from emulators.fly_api import FlyApi, MachineSpec
from renewer.certs import fingerprint_sha256
from renewer.config import FlyTargetConfig
from renewer.deploy_fly import FlyTarget, marker_keys
from renewer.errors import DeployError
from renewer.fly import FlyClient
from renewer.probe import Endpoint, probe_endpoint
from renewer.sensitive import Secret
from renewer.targets import DeployMaterial

pytestmark = pytest.mark.integration

TOKEN = "fm2_deploytoken0123456789"
SNI = "smtp.example.com"
SUBMISSION = "smtp-submission"
INBOUND = "smtp-inbound"


def _material(ca: trustme.CA) -> DeployMaterial:
    cert = ca.issue_cert(SNI)
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    leaf = x509.load_pem_x509_certificate(chain)
    return DeployMaterial(
        certificate_name="smtp",
        key_b64=Secret(base64.b64encode(cert.private_key_pem.bytes()).decode()),
        chain_b64=base64.b64encode(chain).decode(),
        serial=format(leaf.serial_number, "x"),
        fingerprint_sha256=fingerprint_sha256(leaf),
    )


@dataclass
class Fleet:
    api: FlyApi
    client: FlyClient
    locks: dict[str, threading.Lock]

    def target(self, app: str, wait_timeout: float = 10.0, smoke: float = 0.4) -> FlyTarget:
        config = FlyTargetConfig(app=app, api_base_url=self.api.base_url, wait_timeout=wait_timeout)
        lock = self.locks.setdefault(app, threading.Lock())
        return FlyTarget(
            config,
            self.client,
            lock,
            certificate_name="smtp",
            smoke_check_seconds=smoke,
            poll_interval=0.1,
        )

    def served(self, app: str, port: int, mode: str = "starttls") -> set[str]:
        """Fingerprints served through the app's front port, hitting every machine."""
        front = self.api.front_port(app, port)
        endpoint = Endpoint.parse(f"127.0.0.1:{front}/{mode}")
        started = sum(
            1 for i in self.api.machine_ids(app) if self.api.machine(app, i).state == "started"
        )
        return {
            fingerprint_sha256(probe_endpoint(endpoint, SNI, timeout=5).leaf)
            for _ in range(2 * started)
        }


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with (
        FlyApi(
            tmp_path / "fly",
            tokens={TOKEN: frozenset({SUBMISSION, INBOUND})},
            check_interval=0.1,
        ) as api,
        FlyClient(api.base_url, Secret(f"FlyV1 {TOKEN}"), timeout=10) as client,
    ):
        yield Fleet(api, client, {})


def _all_started(api: FlyApi, app: str) -> bool:
    return all(
        api.machine(app, i).state in {"started", "stopped"}
        and (api.machine(app, i).state == "stopped" or bool(api.machine(app, i).host_ports))
        for i in api.machine_ids(app)
    )


def test_rolls_two_apps_machine_by_machine(fleet: Fleet) -> None:
    api = fleet.api
    smtp = ("587/starttls", "465/tls")
    sub_ids = api.add_app(
        SUBMISSION,
        [
            MachineSpec(listen=smtp),
            MachineSpec(listen=smtp),
            MachineSpec(listen=smtp, state="stopped"),
        ],
    )
    [inbound_id] = api.add_app(INBOUND, [MachineSpec(listen=("25/starttls",))])
    stopped_id = next(i for i in sub_ids if api.machine(SUBMISSION, i).state == "stopped")
    assert api.wait_until(lambda: _all_started(api, SUBMISSION) and _all_started(api, INBOUND))
    material = _material(trustme.CA())
    # Negative control: before the deployment nothing serves the new certificate.
    assert material.fingerprint_sha256 not in fleet.served(SUBMISSION, 587)
    before = {i: api.machine(SUBMISSION, i).instance_id for i in sub_ids}
    configs = {i: dict(api.machine(SUBMISSION, i).config) for i in sub_ids}

    results = [fleet.target(SUBMISSION).deploy(material), fleet.target(INBOUND).deploy(material)]

    assert [r.status for r in results] == ["deployed", "deployed"]
    assert [r.name for r in results] == [SUBMISSION, INBOUND]
    assert "without starting" in results[0].detail
    for app, port, mode in (
        (SUBMISSION, 587, "starttls"),
        (SUBMISSION, 465, "tls"),
        (INBOUND, 25, "starttls"),
    ):
        assert fleet.served(app, port, mode) == {material.fingerprint_sha256}, (app, port)
    for app in (SUBMISSION, INBOUND):
        assert api.secrets_calls(app) == 1
        assert api.overlapping_updates(app) == []
        assert api.secret_value(app, "FULLCHAIN") == material.chain_b64
        assert api.secret_value(app, "PRIVATEKEY") == material.key_b64.reveal()
    timeline = api.update_timeline(SUBMISSION)
    assert [w.machine_id for w in timeline] == sorted(sub_ids)  # sorted by id, one each
    assert all(w.lease_nonce is not None for w in timeline)
    version = api.secrets_version(SUBMISSION)
    for machine_id in sub_ids:
        view = api.machine(SUBMISSION, machine_id)
        assert view.instance_id != before[machine_id]
        fingerprint_key, serial_key = marker_keys("smtp")
        assert view.config["metadata"][fingerprint_key] == material.fingerprint_sha256
        assert view.config["metadata"][serial_key] == material.serial
        assert view.config["metadata"]["fly_process_group"] == "app"  # kept
        # Only metadata changed: the rest of the machine's own config went back verbatim.
        assert {k: v for k, v in view.config.items() if k != "metadata"} == {
            k: v for k, v in configs[machine_id].items() if k != "metadata"
        }
    stopped = api.machine(SUBMISSION, stopped_id)
    assert stopped.state == "created"
    assert stopped.pid is None
    for machine_id in set(sub_ids) - {stopped_id}:
        assert api.machine(SUBMISSION, machine_id).booted_secrets_version == version
    assert api.machine(INBOUND, inbound_id).state == "started"
    # No lease is left behind.
    assert all(fleet.client.acquire_lease(SUBMISSION, i, 5) for i in sub_ids)


def _machines(fleet: Fleet, count: int = 3) -> list[str]:
    ids = fleet.api.add_app(
        SUBMISSION, [MachineSpec(listen=("587/starttls",)) for _ in range(count)]
    )
    assert fleet.api.wait_until(lambda: _all_started(fleet.api, SUBMISSION))
    return ids


@pytest.mark.parametrize("fault", ["never_starts", "fails_checks", "crash_loop"])
def test_a_bad_machine_halts_the_rollout_and_a_rerun_completes(fleet: Fleet, fault: str) -> None:
    api = fleet.api
    ids = _machines(fleet)
    before = {i: api.machine(SUBMISSION, i).instance_id for i in ids}
    bad = ids[1]
    getattr(
        api,
        {
            "never_starts": "machine_never_starts",
            "fails_checks": "machine_fails_checks",
            "crash_loop": "crash_loop",
        }[fault],
    )(SUBMISSION, bad)
    material = _material(trustme.CA())

    with pytest.raises(DeployError) as info:
        # The crash comes ~0.1 s after start; a longer smoke window keeps this robust under load.
        smoke = 1.5 if fault == "crash_loop" else 0.4
        fleet.target(SUBMISSION, wait_timeout=1.5, smoke=smoke).deploy(material)

    message = str(info.value)
    assert f"machine {bad}" in message
    assert SUBMISSION in message
    expected = {
        "never_starts": "did not reach state started",
        "fails_checks": "health checks not passing",
        "crash_loop": "crash-looping",
    }[fault]
    assert expected in message
    assert api.machine(SUBMISSION, ids[0]).instance_id != before[ids[0]]  # done before
    assert api.machine(SUBMISSION, ids[2]).instance_id == before[ids[2]]  # untouched
    assert [w.machine_id for w in api.update_timeline(SUBMISSION)] == ids[:2]
    assert material.key_b64.reveal() not in message

    api.clear_faults()
    result = fleet.target(SUBMISSION).deploy(material)
    assert result.status == "deployed"
    assert fleet.served(SUBMISSION, 587) == {material.fingerprint_sha256}
    assert api.secrets_calls(SUBMISSION) == 2
    assert api.overlapping_updates(SUBMISSION) == []


def test_a_lease_held_elsewhere_stops_before_changing_the_machine(fleet: Fleet) -> None:
    api = fleet.api
    ids = _machines(fleet)
    before = {i: api.machine(SUBMISSION, i).instance_id for i in ids}
    nonce = fleet.client.acquire_lease(SUBMISSION, ids[0], 60)
    with pytest.raises(DeployError) as info:
        fleet.target(SUBMISSION).deploy(_material(trustme.CA()))
    assert f"machine {ids[0]}" in str(info.value)
    assert "lease" in str(info.value)
    assert {i: api.machine(SUBMISSION, i).instance_id for i in ids} == before
    fleet.client.release_lease(SUBMISSION, ids[0], nonce)


def test_deployments_to_one_app_never_overlap(fleet: Fleet) -> None:
    api = fleet.api
    _machines(fleet, 2)
    ca = trustme.CA()
    materials = [_material(ca), _material(ca)]
    errors: list[BaseException] = []

    def run(material: DeployMaterial) -> None:
        try:
            fleet.target(SUBMISSION).deploy(material)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(m,)) for m in materials]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert api.secrets_calls(SUBMISSION) == 2
    assert len(api.update_timeline(SUBMISSION)) == 4
    assert api.overlapping_updates(SUBMISSION) == []
    served = fleet.served(SUBMISSION, 587)
    assert len(served) == 1
    assert served <= {m.fingerprint_sha256 for m in materials}


def test_an_app_without_machines_gets_its_secrets(fleet: Fleet) -> None:
    fleet.api.add_app(SUBMISSION)
    result = fleet.target(SUBMISSION).deploy(_material(trustme.CA()))
    assert result.status == "deployed"
    assert "no machines" in result.detail
    assert fleet.api.secrets_calls(SUBMISSION) == 1


def test_secrets_call_failure_is_a_deploy_error(fleet: Fleet) -> None:
    fleet.api.add_app(SUBMISSION)
    fleet.api.inject_fault("POST", r"/secrets$", 422, times=1)
    with pytest.raises(DeployError) as info:
        fleet.target(SUBMISSION).deploy(_material(trustme.CA()))
    assert "secrets" in str(info.value)
    assert fleet.api.secrets_calls(SUBMISSION) == 0


def test_a_412_right_after_the_secrets_call_is_retried(fleet: Fleet) -> None:
    ids = _machines(fleet, 1)
    fleet.api.inject_fault("POST", rf"/machines/{ids[0]}$", 412, times=1)
    material = _material(trustme.CA())
    assert fleet.target(SUBMISSION).deploy(material).status == "deployed"
    statuses = [
        e.status
        for e in fleet.api.request_log
        if e.path.endswith(f"/machines/{ids[0]}") and e.method == "POST"
    ]
    assert statuses == [412, 200]
    assert fleet.served(SUBMISSION, 587) == {material.fingerprint_sha256}


def test_rollout_problem_sees_a_half_finished_rollout_of_its_own_certificate_only(
    fleet: Fleet,
) -> None:
    api = fleet.api
    ids = _machines(fleet)
    config = FlyTargetConfig(app=SUBMISSION, api_base_url=api.base_url, wait_timeout=1.5)
    lock = fleet.locks.setdefault(SUBMISSION, threading.Lock())

    def target(name: str) -> FlyTarget:
        return FlyTarget(
            config,
            fleet.client,
            lock,
            certificate_name=name,
            smoke_check_seconds=0.4,
            poll_interval=0.1,
        )

    smtp = _material(trustme.CA())
    other = replace(_material(trustme.CA()), certificate_name="mx")
    target("smtp").deploy(smtp)
    assert target("smtp").rollout_problem() is None

    # A second certificate on the same app stops half-way (its 2nd machine fails checks).
    api.machine_fails_checks(SUBMISSION, ids[1])
    with pytest.raises(DeployError):
        target("mx").deploy(other)

    problem = target("mx").rollout_problem()
    assert problem is not None
    assert "the last rollout did not finish" in problem
    # The first certificate's markers are its own: its rollout is still complete.
    assert target("smtp").rollout_problem() is None
