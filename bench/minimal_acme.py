"""The floor of the benchmark: the fewest steps a Python client can take with ``acme`` 5.9.

One process issues the certificates one after another: account (found from its key, or
registered once), then per certificate new order -> RFC 2136 TXT updates -> answer ->
poll the order -> finalize -> poll -> download -> remove the TXT records. No propagation
check (BIND serves an update as soon as it acknowledges it), no validation, no deployment;
the order is polled every 20 ms rather than with ``poll_and_finalize``'s 1 s rounds.

    python bench/minimal_acme.py --directory URL --ca-bundle PEM --account-key FILE \
        --dns-server 127.0.0.1:PORT --tsig-name NAME --out DIR --cert a.example.com,b.example.com
    (TSIG secret in $RFC2136_TSIG_SECRET)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import dns.name
import dns.query
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.tsig
import dns.tsigkeyring
import dns.update
from acme import challenges, client, crypto_util, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWKEC

POLL = 0.02  # seconds between order polls


def _account(directory: str, ca_bundle: str, key_path: Path) -> client.ClientV2:
    if key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        existing = True
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        existing = False
    net = client.ClientNetwork(
        JWKEC(key=key),
        alg=ES256,
        verify_ssl=ca_bundle,  # type: ignore[arg-type]  # a CA path works (D.4)
        user_agent="bench-minimal",
    )
    acme = client.ClientV2(client.ClientV2.get_directory(directory, net), net)
    if existing:
        acme.query_registration(messages.RegistrationResource(body=messages.Registration(), uri=""))
    else:
        acme.new_account(messages.NewRegistration.from_data(terms_of_service_agreed=True))
    return acme


def _update(zone: str, keyring: dict[dns.name.Name, dns.tsig.Key]) -> dns.update.UpdateMessage:
    return dns.update.UpdateMessage(
        zone, keyring=keyring, keyname=next(iter(keyring)), keyalgorithm="hmac-sha256"
    )


def _poll(acme: client.ClientV2, uri: str, waiting: tuple[str, ...]) -> messages.Order:
    while True:
        body: messages.Order = messages.Order.from_json(acme._post_as_get(uri).json())
        if body.status.name not in waiting:
            return body
        time.sleep(POLL)


def issue(
    acme: client.ClientV2,
    names: list[str],
    zone: str,
    server: tuple[str, int],
    keyring: dict[dns.name.Name, dns.tsig.Key],
    out: Path,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    orderr = acme.new_order(crypto_util.make_csr(key_pem, names))
    answers = []
    records = []
    for authzr in orderr.authorizations:
        challb = next(c for c in authzr.body.challenges if isinstance(c.chall, challenges.DNS01))
        response, value = challb.response_and_validation(acme.net.key)
        assert isinstance(challb.chall, challenges.DNS01)
        fqdn = challb.chall.validation_domain_name(authzr.body.identifier.value) + "."
        rdata = dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, [value.encode()])
        update = _update(zone, keyring)
        update.add(fqdn, 60, rdata)
        dns.query.tcp(update, server[0], port=server[1], timeout=10)
        records.append((fqdn, rdata))
        answers.append((challb, response))
    try:
        for challb, response in answers:
            acme.answer_challenge(challb, response)
        body = _poll(acme, orderr.uri, ("pending",))
        if body.status != messages.STATUS_READY:
            raise SystemExit(f"order {orderr.uri} is {body.status}: {body.error}")
    finally:
        for fqdn, rdata in records:
            update = _update(zone, keyring)
            update.delete(fqdn, rdata)
            dns.query.tcp(update, server[0], port=server[1], timeout=10)
    acme.begin_finalization(orderr)
    body = _poll(acme, orderr.uri, ("ready", "processing"))
    if body.status != messages.STATUS_VALID or body.certificate is None:
        raise SystemExit(f"order {orderr.uri} ended {body.status}: {body.error}")
    chain = acme._post_as_get(body.certificate).text
    (out / f"{names[0]}.pem").write_text(chain)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--directory", required=True)
    parser.add_argument("--ca-bundle", required=True)
    parser.add_argument("--account-key", required=True, type=Path)
    parser.add_argument("--dns-server", required=True)
    parser.add_argument("--zone", default="example.com")
    parser.add_argument("--tsig-name", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cert", action="append", required=True, help="comma-separated names")
    args = parser.parse_args()
    host, _, port = args.dns_server.rpartition(":")
    keyring = dns.tsigkeyring.from_text(
        {args.tsig_name: ("hmac-sha256", os.environ["RFC2136_TSIG_SECRET"])}
    )
    acme = _account(args.directory, args.ca_bundle, args.account_key)
    args.out.mkdir(parents=True, exist_ok=True)
    for names in args.cert:
        issue(acme, names.split(","), args.zone, (host, int(port)), keyring, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
