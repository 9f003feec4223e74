"""A DNS server for tests: answers A queries for the names in `records` (UDP on 127.0.0.1), NXDOMAIN otherwise.

What a Kubernetes headless Service does for the gateway: its name resolves to the ready pods' addresses, and a
rollout changes them. gRPC's resolver reaches it through targets like `dns://127.0.0.1:PORT/vae.test:50053`.
"""

from __future__ import annotations

import socket
import struct
import threading


class FakeDNS:
    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.queries: list[str] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self._sock.close()

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self._sock.recvfrom(4096)
            except OSError:  # closed
                return
            self._sock.sendto(self._answer(query), peer)

    def _answer(self, query: bytes) -> bytes:
        qid, flags = struct.unpack(">HH", query[:4])
        labels, i = [], 12
        while query[i]:
            labels.append(query[i + 1:i + 1 + query[i]].decode())
            i += 1 + query[i]
        qtype = struct.unpack(">H", query[i + 1:i + 3])[0]
        question = query[12:i + 5]
        name = ".".join(labels).lower()
        self.queries.append(name)
        ips = self.records.get(name, []) if qtype == 1 else []  # A records only; AAAA etc. get none
        rcode = 0 if name in self.records else 3
        header = struct.pack(">HHHHHH", qid, 0x8400 | (flags & 0x0100) | rcode, 1, len(ips), 0, 0)
        # each answer points back at the question's name (offset 12), class IN, TTL 0, 4 bytes of IPv4
        answers = b"".join(struct.pack(">HHHIH", 0xC00C, 1, 1, 0, 4) + socket.inet_aton(ip) for ip in ips)
        return header + question + answers
