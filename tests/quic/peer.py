"""A QUIC server and a moving QUIC client (aioquic), for xdplb's QUIC
connection-ID routing test.

server: answers every stream with its name. Every connection ID it issues
carries its server id in the plaintext layout of the IETF QUIC-LB draft:
one octet with the config rotation bits 000, the server id (2 octets,
big-endian), then random octets.

client: connects from FIRST (address:port), asks on a stream which server
answers, then moves to THEN (another address and port, a new socket, a
new connection ID, as after a NAT rebinding or a network change) and asks
again. Prints one JSON line: {"first": name, "then": name or null,
"error": text or null}; exits 0 only if both were answered.
"""

import argparse
import asyncio
import datetime
import ipaddress
import json
import os
import select
import socket
import ssl
import sys
import tempfile
import time

from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.quic import connection as quic_connection
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, StreamDataReceived

ALPN = ["xdplb-test"]
CID_LENGTH = 8


class ServerIdOs:
    """`os` for aioquic's connection module: connection IDs it draws carry
    the server id; everything else is random as before."""

    def __init__(self, server_id: int):
        self.server_id = server_id

    def urandom(self, n: int) -> bytes:
        if n != CID_LENGTH:
            return os.urandom(n)
        first = os.urandom(1)[0] & 0x1F
        return bytes([first]) + self.server_id.to_bytes(2, "big") + os.urandom(n - 3)

    def __getattr__(self, name):
        return getattr(os, name)


def certificate(directory: str, name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def run_server(args) -> None:
    quic_connection.os = ServerIdOs(args.server_id)
    name = args.name.encode()

    class Answer(QuicConnectionProtocol):
        def quic_event_received(self, event):
            if isinstance(event, StreamDataReceived) and event.end_stream:
                self._quic.send_stream_data(event.stream_id, name + b"\n", end_stream=True)
                self.transmit()

    async def main():
        with tempfile.TemporaryDirectory() as d:
            config = QuicConfiguration(
                is_client=False, alpn_protocols=ALPN, connection_id_length=CID_LENGTH
            )
            config.load_cert_chain(*certificate(d, args.name))
            await serve(args.bind, args.port, configuration=config, create_protocol=Answer)
            print("ready", flush=True)
            await asyncio.sleep(args.lifetime)

    asyncio.run(main())


def endpoint(text: str):
    host, _, port = text.rpartition(":")
    return str(ipaddress.ip_address(host.strip("[]"))), int(port)


class Client:
    def __init__(self, vip, port):
        config = QuicConfiguration(
            is_client=True, alpn_protocols=ALPN, connection_id_length=CID_LENGTH
        )
        config.verify_mode = ssl.CERT_NONE
        self.server = (vip, port)
        self.quic = QuicConnection(configuration=config)
        self.sock = None
        self.handshake = False
        self.answers = {}
        self.closed = None

    def bind(self, addr):
        if self.sock is not None:
            self.sock.close()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(addr)

    def pump(self, done, limit: float) -> bool:
        """Exchange datagrams until done() or `limit` seconds pass."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            for data, addr in self.quic.datagrams_to_send(now=time.time()):
                self.sock.sendto(data, addr)
            event = self.quic.next_event()
            while event is not None:
                if isinstance(event, HandshakeCompleted):
                    self.handshake = True
                elif isinstance(event, StreamDataReceived):
                    self.answers[event.stream_id] = self.answers.get(event.stream_id, b"") + event.data
                elif isinstance(event, ConnectionTerminated):
                    self.closed = event.reason_phrase or f"closed, error {event.error_code}"
                event = self.quic.next_event()
            if done():
                return True
            if self.closed:
                return False
            timer = self.quic.get_timer()
            wait = 0.05 if timer is None else max(0.0, min(0.05, timer - time.time()))
            ready, _, _ = select.select([self.sock], [], [], wait)
            if ready:
                data, addr = self.sock.recvfrom(65536)
                self.quic.receive_datagram(data, addr, now=time.time())
            elif timer is not None and time.time() >= timer:
                self.quic.handle_timer(now=time.time())
        return False

    def ask(self, limit: float):
        stream = self.quic.get_next_available_stream_id()
        self.quic.send_stream_data(stream, b"who?\n", end_stream=True)
        answered = self.pump(lambda: self.answers.get(stream, b"").endswith(b"\n"), limit)
        return self.answers[stream].decode().strip() if answered else None


def run_client(args) -> int:
    vip, port = endpoint(args.vip)
    client = Client(vip, port)
    client.bind(endpoint(args.first))
    out = {"first": None, "then": None, "error": None}
    client.quic.connect(client.server, now=time.time())
    if not client.pump(lambda: client.handshake, args.timeout):
        out["error"] = f"no handshake from {args.first}: {client.closed or 'timed out'}"
    else:
        out["first"] = client.ask(args.timeout)
        if out["first"] is None:
            out["error"] = "no answer before moving"
        else:
            client.bind(endpoint(args.then))
            client.quic.change_connection_id()
            out["then"] = client.ask(args.timeout)
            if out["then"] is None:
                out["error"] = f"no answer after moving to {args.then}: {client.closed or 'timed out'}"
    print(json.dumps(out), flush=True)
    return 0 if out["error"] is None else 2


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--server-id", type=int, required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--lifetime", type=float, default=120)
    c = sub.add_parser("client")
    c.add_argument("--vip", required=True)
    c.add_argument("--first", required=True)
    c.add_argument("--then", required=True)
    c.add_argument("--timeout", type=float, default=4)
    args = p.parse_args()
    if args.mode == "server":
        run_server(args)
        return 0
    return run_client(args)


if __name__ == "__main__":
    sys.exit(main())
