"""renewer.report: the JSON shape of DESIGN.md "Report", status aggregation, the subject
line (outcome first) and the readable text, with facts taken from real certificates."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from renewer.certs import fingerprint_sha256, load_pem_chain, not_after, serial_hex
from renewer.decide import assess_endpoint
from renewer.probe import Endpoint, ServedCertificate
from renewer.report import CertificateReport, EndpointReport, RunReport, iso_utc
from renewer.run import endpoint_reports
from renewer.targets import TargetResult

NOW = datetime(2027, 3, 1, 9, 30, 15, 123456, tzinfo=UTC)
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
HEX = re.compile(r"^[0-9a-f]+$")

# DESIGN.md "Report" (the report may add keys; these must be there with these types).
RUN_KEYS = {"status", "certificates", "error"}
CERT_KEYS = {
    "name",
    "action",
    "reason",
    "serial",
    "not_after",
    "fingerprint_sha256",
    "targets",
    "endpoints",
}
TARGET_KEYS = {"type", "name", "status", "detail"}
ENDPOINT_KEYS = {"endpoint", "serial", "not_after", "days_left", "matches_new"}


@pytest.fixture(scope="module")
def leaf() -> x509.Certificate:
    ca = trustme.CA()
    issued = ca.issue_cert(
        "smtp.example.com",
        not_before=NOW - timedelta(days=1),
        not_after=datetime(2027, 3, 4, 12, 0, tzinfo=UTC),
    )
    return load_pem_chain(issued.cert_chain_pems[0].bytes())[0]


def _renewed(leaf: x509.Certificate, name: str = "smtp") -> CertificateReport:
    return CertificateReport(
        name=name,
        action="renewed",
        reason="smtp.example.com:587: expires in 3 day(s) (renewal.before_days is 30)",
        serial=serial_hex(leaf),
        not_after=not_after(leaf),
        fingerprint_sha256=fingerprint_sha256(leaf),
        targets=[
            TargetResult("fly", "example-smtp", "deployed", "2 machines updated"),
            TargetResult("dotenv", "smtp.env", "skipped", "already holds this certificate"),
        ],
        endpoints=[
            EndpointReport(
                "smtp.example.com:587",
                serial=serial_hex(leaf),
                not_after=not_after(leaf),
                days_left=3,
                matches_new=True,
            )
        ],
    )


def _skipped(name: str = "other", days: int = 45) -> CertificateReport:
    return CertificateReport(
        name=name,
        action="skipped",
        reason="every endpoint serves a good certificate",
        endpoints=[
            EndpointReport(
                "mx.example.net:25",
                serial="1a2b",
                not_after=NOW + timedelta(days=days, hours=1),
                days_left=days,
            )
        ],
    )


def _failed(name: str = "broken", step: str = "deploy") -> CertificateReport:
    report = CertificateReport(name=name, action="renewed", reason="forced with --force")
    report.targets.append(
        TargetResult("fly", "broken-smtp", "failed", "machine 3d8d9 checks critical")
    )
    report.fail(step, "fly broken-smtp: machine 3d8d9 did not pass its checks within 300s")
    return report


def _run(*certificates: CertificateReport, dry_run: bool = False) -> RunReport:
    report = RunReport(started_at=NOW, dry_run=dry_run)
    for cert in certificates:
        report.add(cert)
    report.finished_at = NOW + timedelta(seconds=42)
    return report


# --------------------------------------------------------------------- JSON shape


def test_json_shape_matches_design(leaf: x509.Certificate) -> None:
    data = _run(_renewed(leaf), _skipped()).to_json()
    assert json.loads(json.dumps(data)) == data  # plain JSON values only
    assert set(data) >= RUN_KEYS
    assert data["status"] == "renewed"
    assert data["error"] is None
    assert [c["name"] for c in data["certificates"]] == ["smtp", "other"]
    for cert in data["certificates"]:
        assert set(cert) >= CERT_KEYS
        assert cert["action"] in ("renewed", "skipped", "failed")
        assert isinstance(cert["reason"], str)
        for target in cert["targets"]:
            assert set(target) == TARGET_KEYS
            assert target["status"] in ("deployed", "skipped", "failed")
        for endpoint in cert["endpoints"]:
            assert set(endpoint) == ENDPOINT_KEYS
    renewed = data["certificates"][0]
    assert renewed["targets"] == [
        {
            "type": "fly",
            "name": "example-smtp",
            "status": "deployed",
            "detail": "2 machines updated",
        },
        {
            "type": "dotenv",
            "name": "smtp.env",
            "status": "skipped",
            "detail": "already holds this certificate",
        },
    ]
    assert renewed["endpoints"] == [
        {
            "endpoint": "smtp.example.com:587",
            "serial": serial_hex(leaf),
            "not_after": "2027-03-04T12:00:00Z",
            "days_left": 3,
            "matches_new": True,
        }
    ]
    skipped = data["certificates"][1]
    assert (skipped["serial"], skipped["not_after"], skipped["fingerprint_sha256"]) == (
        None,
        None,
        None,
    )
    assert skipped["targets"] == []


def test_certificate_facts_are_formatted_as_design_says(leaf: x509.Certificate) -> None:
    cert = _run(_renewed(leaf)).to_json()["certificates"][0]
    assert HEX64.match(cert["fingerprint_sha256"])
    assert cert["fingerprint_sha256"] == leaf.fingerprint(hashes.SHA256()).hex()
    assert HEX.match(cert["serial"])
    assert int(cert["serial"], 16) == leaf.serial_number
    assert cert["not_after"] == "2027-03-04T12:00:00Z"
    # Negative control: the patterns reject the other common spellings.
    colons = leaf.fingerprint(hashes.SHA256()).hex(":")
    assert not HEX64.match(colons)
    assert not HEX64.match(cert["fingerprint_sha256"].upper())
    assert not HEX.match(str(leaf.serial_number) + ":")


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        (datetime(2027, 3, 4, 12, 0, tzinfo=UTC), "2027-03-04T12:00:00Z"),
        (datetime(2027, 3, 4, 12, 0, 0, 999999, tzinfo=UTC), "2027-03-04T12:00:00Z"),
        (datetime(2027, 3, 4, 14, 0, tzinfo=timezone(timedelta(hours=2))), "2027-03-04T12:00:00Z"),
        (
            datetime(2027, 3, 4, 23, 30, tzinfo=timezone(timedelta(hours=-5))),
            "2027-03-05T04:30:00Z",
        ),
        (None, None),
    ],
)
def test_iso_utc(when: datetime | None, expected: str | None) -> None:
    assert iso_utc(when) == expected
    if expected is not None:
        assert ISO.match(expected)


def test_days_left_is_the_floor(leaf: x509.Certificate) -> None:
    root_ca = trustme.CA()
    roots = [x509.load_pem_x509_certificate(root_ca.cert_pem.bytes())]
    endpoint = Endpoint.parse("smtp.example.com:587")
    cases = [
        (timedelta(days=10, hours=23, minutes=59), 10),
        (timedelta(days=10, seconds=1), 10),
        (timedelta(hours=23), 0),
        (timedelta(hours=-1), -1),
    ]
    now = datetime.now(UTC).replace(microsecond=0)
    for remaining, expected in cases:
        issued = root_ca.issue_cert(
            "smtp.example.com", not_before=now - timedelta(days=30), not_after=now + remaining
        )
        cert = load_pem_chain(issued.cert_chain_pems[0].bytes())[0]
        state = assess_endpoint(
            endpoint,
            ServedCertificate(endpoint, cert, ()),
            None,
            domains=("smtp.example.com",),
            roots=roots,
            use_system_roots=False,
            before_days=5,
            now=now,
        )
        (report,) = endpoint_reports([state], now)
        data = report.to_json()
        assert data["days_left"] == expected, remaining
        assert isinstance(data["days_left"], int)
        assert data["serial"] == serial_hex(cert)
        assert ISO.match(data["not_after"])


def test_unreachable_endpoint_in_the_report() -> None:
    report = EndpointReport("smtp.example.com:465", problems=("unreachable: refused",))
    assert report.to_json() == {
        "endpoint": "smtp.example.com:465",
        "serial": None,
        "not_after": None,
        "days_left": None,
        "matches_new": None,
    }
    assert report.status == "problems"
    checked = report.to_json(with_status=True)
    assert checked["status"] == "problems"
    assert checked["problems"] == ["unreachable: refused"]
    good = EndpointReport("smtp.example.com:587", serial="ab", days_left=40)
    assert good.to_json(with_status=True)["status"] == "ok"  # negative control


# --------------------------------------------------------------------- status


@pytest.mark.parametrize(
    ("actions", "expected"),
    [
        ((), "nothing_due"),
        (("skipped",), "nothing_due"),
        (("skipped", "skipped"), "nothing_due"),
        (("renewed",), "renewed"),
        (("skipped", "renewed"), "renewed"),
        (("failed",), "failed"),
        (("renewed", "failed"), "failed"),
        (("failed", "renewed", "skipped"), "failed"),
    ],
)
def test_status_aggregation(actions: tuple[str, ...], expected: str) -> None:
    certs = []
    for i, action in enumerate(actions):
        cert = CertificateReport(name=f"c{i}", action="skipped")
        if action == "failed":
            cert.fail("issue", "the CA said no")
        elif action == "renewed":
            cert.action = "renewed"
        certs.append(cert)
    report = _run(*certs)
    assert report.status == expected
    assert report.to_json()["status"] == expected
    assert (report.to_json()["error"] is None) is (expected != "failed")


def test_run_level_failure_fails_the_run(leaf: x509.Certificate) -> None:
    report = _run(_renewed(leaf))
    before = report.status
    report.fail("report", "the report email could not be sent: MailPace API: HTTP 503")
    report.fail("later", "a second failure does not replace the first")
    assert (before, report.status) == ("renewed", "failed")
    assert report.to_json()["error"] == {
        "step": "report",
        "message": "the report email could not be sent: MailPace API: HTTP 503",
    }


def test_certificate_failure_is_the_run_error() -> None:
    data = _run(_skipped(), _failed("broken", "deploy")).to_json()
    assert data["status"] == "failed"
    assert data["error"]["step"] == "deploy"
    assert data["error"]["message"].startswith("broken: fly broken-smtp")
    broken = data["certificates"][1]
    assert broken["action"] == "failed"
    assert broken["targets"][0]["status"] == "failed"


# --------------------------------------------------------------------- subject and text


def test_subject_outcome_first(leaf: x509.Certificate) -> None:
    assert _run(_renewed(leaf), _skipped()).subject() == "Renewed: smtp"
    assert _run(_renewed(leaf), dry_run=True).subject() == "Dry run OK: smtp"
    nothing = _run(_skipped("a", 45), _skipped("b", 12)).subject()
    assert nothing == "Nothing due: a, b (soonest expiry in 12 days)"
    failed = _run(_renewed(leaf), _failed("broken", "deploy")).subject()
    assert failed == "FAILED: certificate renewal (broken) at step deploy"
    config = RunReport(started_at=NOW)
    config.fail("config", "certificates[0].name: expected letters")
    assert config.subject().startswith("FAILED:")
    assert "step config" in config.subject()
    assert _run().subject() == "Nothing due: no certificates"


@pytest.mark.parametrize(
    ("step", "advice"),
    [
        ("config", "fix the configuration"),
        ("decide", "endpoints are reachable"),
        ("issue", "DNS provider token"),
        ("validate", "nothing was deployed"),
        ("deploy", "renewer run --force"),
        ("verify", "restarted with the new secrets"),
        ("report", "MailPace token"),
    ],
)
def test_text_on_failure_says_what_to_do(step: str, advice: str) -> None:
    text = _run(_skipped(), _failed("broken", step)).render_text()
    first, blank, *rest = text.splitlines()
    assert first.startswith("FAILED:")
    assert blank == ""
    assert f"What failed: step '{step}': broken: fly broken-smtp" in text
    what_to_do = next(line for line in rest if line.startswith("What to do: "))
    assert advice in what_to_do


def test_text_on_success_has_no_failure_advice(leaf: x509.Certificate) -> None:
    text = _run(_renewed(leaf), _skipped()).render_text()
    assert text.splitlines()[0] == "Renewed: smtp"
    assert "What to do" not in text
    assert "What failed" not in text
    assert f"serial {serial_hex(leaf)}, expires 2027-03-04T12:00:00Z" in text
    assert f"sha256 {fingerprint_sha256(leaf)}" in text
    assert "target fly example-smtp: deployed (2 machines updated)" in text
    assert "serves the new certificate" in text
    assert text.endswith("Status: renewed.\n")


def test_text_names_unreachable_endpoints_and_stale_ones() -> None:
    cert = CertificateReport(name="smtp", action="failed", reason="forced with --force")
    cert.endpoints = [
        EndpointReport("smtp.example.com:465", problems=("unreachable: refused",)),
        EndpointReport(
            "smtp.example.com:587",
            serial="ab",
            not_after=NOW + timedelta(days=5),
            days_left=5,
            matches_new=False,
        ),
    ]
    cert.fail("verify", "smtp.example.com:587 still serves ab")
    text = _run(cert).render_text()
    assert "endpoint smtp.example.com:465: unreachable: refused" in text
    assert "endpoint smtp.example.com:587: serial ab, 5 days left" in text
    assert "NOT the new certificate" in text
