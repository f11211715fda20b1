"""A small authoritative DNS server on loopback, for Pebble's DNS-01 lookups and our own
propagation checks.

Records live in a ``RecordStore`` that other emulators (the Cloudflare-compatible API)
write into. The server answers over UDP and TCP on the same port (Pebble 2.10's VA asks
over TCP when started with ``-dnsserver``; our propagation check asks over UDP first),
with the AA flag for its zones: the stored records, plus SOA and NS at each zone apex and
an A record for the NS host. NXDOMAIN only for names with nothing at or below them
(RFC 8020), NOERROR/NODATA with the SOA otherwise, and REFUSED outside its zones.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import struct
import threading
from collections.abc import Iterable
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

log = logging.getLogger(__name__)

TTL = 60
NS_ADDRESS = "127.0.0.1"
UDP_MAX = 512  # without EDNS (RFC 1035 section 4.2.1)


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


class RecordStore:
    """Thread-safe in-memory records: name (lowercase, no trailing dot) -> rtype -> values.

    The same value may be added twice (two TXT records with equal content); ``remove``
    takes one away. ``serial`` grows with every change and becomes the zones' SOA serial.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, list[str]]] = {}
        self._serial = 1

    def add(self, name: str, rtype: str, value: str) -> None:
        with self._lock:
            by_type = self._records.setdefault(_norm(name), {})
            by_type.setdefault(rtype.upper(), []).append(value)
            self._serial += 1

    def remove(self, name: str, rtype: str, value: str) -> bool:
        """Remove one record with this value; False when there was none."""
        name, rtype = _norm(name), rtype.upper()
        with self._lock:
            values = self._records.get(name, {}).get(rtype)
            if not values or value not in values:
                return False
            values.remove(value)
            if not values:
                del self._records[name][rtype]
                if not self._records[name]:
                    del self._records[name]
            self._serial += 1
            return True

    def values(self, name: str, rtype: str) -> list[str]:
        with self._lock:
            return list(self._records.get(_norm(name), {}).get(rtype.upper(), []))

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._records)

    def types(self, name: str) -> list[str]:
        with self._lock:
            return sorted(self._records.get(_norm(name), {}))

    @property
    def serial(self) -> int:
        with self._lock:
            return self._serial


class DnsServer:
    """Serves ``store`` for ``zones`` on ``host:port`` (port 0 = a free one), UDP and TCP.

    Use as a context manager; ``address`` is the bound (host, port).
    """

    def __init__(
        self,
        store: RecordStore,
        zones: Iterable[str],
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.store = store
        self.zones = sorted({_norm(z) for z in zones}, key=len, reverse=True)
        if not self.zones:
            raise ValueError("DnsServer needs at least one zone")
        self._host = host
        self._port = port
        self._udp: socketserver.ThreadingUDPServer | None = None
        self._tcp: socketserver.ThreadingTCPServer | None = None
        self._threads: list[threading.Thread] = []
        self._queries_lock = threading.Lock()
        self._queries: list[tuple[str, str, str]] = []

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        if self._udp is None:
            raise RuntimeError("DnsServer is not running")
        host, port = self._udp.server_address[:2]
        return str(host), int(port)

    def start(self) -> DnsServer:
        server = self
        for _attempt in range(20):
            tcp = _TcpServer((self._host, self._port), _TcpHandler, server)
            port = tcp.server_address[1]
            try:
                udp = _UdpServer((self._host, port), _UdpHandler, server)
            except OSError:
                tcp.server_close()  # the UDP side of that port is taken: try another one
                if self._port:
                    raise
                continue
            break
        else:
            raise OSError("no port free for both UDP and TCP")
        self._tcp, self._udp = tcp, udp
        for srv in (udp, tcp):
            thread = threading.Thread(
                target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            thread.start()
            self._threads.append(thread)
        log.info("DNS server for %s on %s:%d", ", ".join(self.zones), *self.address)
        return self

    def stop(self) -> None:
        for srv in (self._udp, self._tcp):
            if srv is not None:
                srv.shutdown()
                srv.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
        self._udp = self._tcp = None

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def queries(self) -> list[tuple[str, str, str]]:
        """Every question answered so far: (name, rtype, "udp"|"tcp")."""
        with self._queries_lock:
            return list(self._queries)

    # -- answering ---------------------------------------------------------------------

    def handle(self, wire: bytes, transport: str) -> bytes | None:
        """One query in wire format -> the response in wire format (None: not DNS)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return _formerr(wire)
        response = dns.message.make_response(query)
        response.flags &= ~dns.flags.RA
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP if query.question else dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = _norm(question.name.to_text())
        rtype = dns.rdatatype.to_text(question.rdtype)
        with self._queries_lock:
            self._queries.append((name, rtype, transport))
        self._answer(response, question.name, name, question.rdtype)
        max_size = UDP_MAX
        if transport == "udp" and query.edns >= 0:
            max_size = max(UDP_MAX, query.payload)
        if transport == "tcp":
            return response.to_wire()
        try:
            return response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            response.answer.clear()
            response.authority.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()

    def _zone_of(self, name: str) -> str | None:
        for zone in self.zones:  # longest first
            if name == zone or name.endswith("." + zone):
                return zone
        return None

    def _answer(
        self,
        response: dns.message.Message,
        qname: dns.name.Name,
        name: str,
        rdtype: dns.rdatatype.RdataType,
    ) -> None:
        zone = self._zone_of(name)
        if zone is None:
            response.set_rcode(dns.rcode.REFUSED)
            return
        response.flags |= dns.flags.AA
        records = self._records_at(name, zone)
        wanted = list(records) if rdtype == dns.rdatatype.ANY else [dns.rdatatype.to_text(rdtype)]
        for rtype in wanted:
            values = records.get(rtype)
            if values:
                response.answer.append(_rrset(qname, rtype, values))
        if response.answer:
            return
        if not records and not self._has_descendants(name):
            response.set_rcode(dns.rcode.NXDOMAIN)
        response.authority.append(_rrset(dns.name.from_text(zone), "SOA", [self._soa(zone)]))

    def _records_at(self, name: str, zone: str) -> dict[str, list[str]]:
        records = {rtype: self.store.values(name, rtype) for rtype in self.store.types(name)}
        if name == zone:
            records["SOA"] = [self._soa(zone)]
            records.setdefault("NS", []).insert(0, f"ns1.{zone}.")
        if name == f"ns1.{zone}":
            records.setdefault("A", []).insert(0, NS_ADDRESS)
        return {rtype: values for rtype, values in records.items() if values}

    def _has_descendants(self, name: str) -> bool:
        suffix = "." + name
        return any(n.endswith(suffix) for n in self.store.names())

    def _soa(self, zone: str) -> str:
        # mname rname serial refresh retry expire minimum(negative TTL)
        return f"ns1.{zone}. hostmaster.{zone}. {self.store.serial} 3600 600 86400 {TTL}"


def _rrset(name: dns.name.Name, rtype: str, values: list[str]) -> dns.rrset.RRset:
    rdtype = dns.rdatatype.from_text(rtype)
    rrset = dns.rrset.RRset(name, dns.rdataclass.IN, rdtype)
    for value in values:
        rrset.add(_rdata(rdtype, value), TTL)
    return rrset


def _rdata(rdtype: dns.rdatatype.RdataType, value: str) -> dns.rdata.Rdata:
    if rdtype == dns.rdatatype.TXT:
        # Stored unquoted; one TXT holds several <character-string>s of <= 255 octets.
        raw = value.encode()
        chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
        return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks)
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, value)


def _formerr(wire: bytes) -> bytes | None:
    if len(wire) < 12:
        return None
    (qid,) = struct.unpack("!H", wire[:2])
    # header only: id, QR=1, opcode copied, RCODE=FORMERR, no sections
    flags = 0x8000 | (wire[2] & 0x78) << 8 | dns.rcode.FORMERR
    return struct.pack("!HHHHHH", qid, flags, 0, 0, 0, 0)


class _UdpServer(socketserver.ThreadingUDPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[socketserver.BaseRequestHandler],
        dns_server: DnsServer,
    ) -> None:
        self.dns_server = dns_server
        super().__init__(address, handler)


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[socketserver.BaseRequestHandler],
        dns_server: DnsServer,
    ) -> None:
        self.dns_server = dns_server
        super().__init__(address, handler)


class _UdpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        assert isinstance(self.server, _UdpServer)
        try:
            reply = self.server.dns_server.handle(data, "udp")
        except Exception:
            log.exception("DNS server: cannot answer a UDP query")
            return
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _TcpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        assert isinstance(self.server, _TcpServer)
        conn: socket.socket = self.request
        conn.settimeout(10)
        try:
            while True:  # several length-prefixed messages may share a connection
                header = _recv_exact(conn, 2)
                if header is None:
                    return
                (length,) = struct.unpack("!H", header)
                data = _recv_exact(conn, length)
                if data is None:
                    return
                reply = self.server.dns_server.handle(data, "tcp")
                if reply is None:
                    return
                conn.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            return
        except Exception:
            log.exception("DNS server: cannot answer a TCP query")


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    buf = b""
    while len(buf) < size:
        chunk = conn.recv(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
