"""The benchmark script's argument parsing, log parsing and tables; nothing is started."""

from __future__ import annotations

import pytest

from bench.run_bench import (
    Row,
    Sample,
    format_extras,
    format_table,
    import_summary,
    names_for,
    parse_args,
    propagation_delays,
)


def test_defaults_and_choices() -> None:
    args = parse_args([])
    assert args.scenarios == ["1name", "5names", "20certs"]
    assert args.clients == ["ours", "minimal", "certbot", "lego"]
    assert args.retry_after is None
    assert args.runs == 5
    args = parse_args(["--clients", "ours,lego", "--scenarios", "1name", "--retry-after", "1,2"])
    assert args.clients == ["ours", "lego"]
    assert args.scenarios == ["1name"]
    assert args.retry_after == (1, 2)


@pytest.mark.parametrize(
    "argv",
    [
        ["--clients", "ours,acme.sh"],
        ["--scenarios", "2names"],
        ["--retry-after", "soon"],
        ["--runs", "0"],
    ],
)
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2


def test_names_are_unique_per_client_run_and_certificate() -> None:
    twenty = names_for("ours", "20certs-r0", "20certs")
    assert len(twenty) == 20
    assert all(len(names) == 1 for names in twenty)
    five = names_for("ours", "5names-r0", "5names")
    assert len(five) == 1
    assert len(five[0]) == 5
    flat = [
        n for names in twenty + five + names_for("lego", "20certs-r0", "20certs") for n in names
    ]
    assert len(set(flat)) == len(flat)


def _rows() -> list[Row]:
    return [
        Row("ours", "1name", [Sample(0.5, 0.4, 50, startup=0.3, propagation=[0.01, 0.03])]),
        Row(
            "lego",
            "1name",
            [
                Sample(1.0, 0.02, 45, startup=0.01, propagation=[1.0]),
                Sample(9.0, 0.02, 46, ok=False),
            ],
        ),
    ]


def test_table_has_medians_and_ratios_to_ours() -> None:
    table = format_table(_rows())
    lines = table.splitlines()
    assert lines[0].startswith("| scenario | client |")
    ours = next(line for line in lines if "| ours |" in line)
    lego = next(line for line in lines if "| lego |" in line)
    assert "| 0.50 s | 1.00x |" in ours
    # The failed run is left out of the median and counted: 1 of 2 runs ok.
    assert "| 1.00 s | 2.00x |" in lego
    assert "| 20 ms | 0.05x |" in lego
    assert lego.endswith("| 1/2 |")
    assert "9.00 s" not in table


def test_extras_show_start_up_and_propagation() -> None:
    text = format_extras(_rows())
    ours = next(line for line in text.splitlines() if line.startswith("| ours |"))
    assert "| 0.30 s |" in ours
    assert "20 ms, 30 ms" in ours
    lego = next(line for line in text.splitlines() if line.startswith("| lego |"))
    assert "1.00 s, 1.00 s" in lego


def _query(time: str, name: str, flags: str) -> str:
    # named -g with querylog yes, as BIND 9.18 writes it
    return (
        f"04-Dec-2026 {time} client @0x1 127.0.0.1#1 (_acme-challenge.{name}): "
        f"query: _acme-challenge.{name} IN TXT {flags} (127.0.0.1)"
    )


def _add(time: str, name: str) -> str:
    return (
        f"04-Dec-2026 {time} client @0x2 127.0.0.1#2/key bench-key: updating zone "
        f"'example.com/IN': adding an RR at '_acme-challenge.{name}' TXT \"v\""
    )


LOG = "\n".join(
    [
        _query("16:36:24.302", "a.example.com", "+T"),  # stale-record read, before the add
        _add("16:36:24.306", "a.example.com"),
        _query("16:36:24.314", "a.example.com", "-"),  # ours' propagation check (UDP)
        _query("16:36:24.315", "a.example.com", "+E(0)"),  # lego's check (UDP, EDNS)
        _query("16:36:24.318", "a.example.com", "+T"),  # Pebble's VA
        _query("16:36:24.319", "a.example.com", "+T"),
        _query("16:36:25.000", "b.example.com", "+T"),
    ]
)


def test_propagation_is_update_to_the_cas_first_lookup() -> None:
    delays = propagation_delays(LOG)
    # The lookup before the update and the client's own UDP checks do not count.
    assert delays == {"_acme-challenge.a.example.com": pytest.approx(0.012)}
    # A name never added has no delay, even though the CA looked it up.
    assert "_acme-challenge.b.example.com" not in delays


def test_import_summary_sums_outermost_modules() -> None:
    log = (
        "import time: self [us] | cumulative | imported package\n"
        "import time:       100 |        100 |   dns.name\n"
        "import time:       200 |     300000 | renewer.cli\n"
        "import time:       300 |      20000 | site\n"
    )
    text = import_summary(log)
    assert text.splitlines()[0] == "imports: 0.320 s in all (outermost modules, cumulative):"
    assert text.splitlines()[1].endswith("renewer.cli")
    assert "dns.name" not in text
