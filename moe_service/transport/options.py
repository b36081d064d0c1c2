"""gRPC channel/server options and TLS material shared by every server and client of the project."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

DEFAULT_MAX_MESSAGE_BYTES = 256 << 20  # 256 MiB: 4096 rows x hidden 7168 in fp32 is 117 MiB


def grpc_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # large dispatches: let flow control open the window up front instead of probing for it
        ("grpc.http2.lookahead_bytes", 16 << 20),
        ("grpc.so_reuseport", 0),
    ]


@dataclass(frozen=True)
class TLSConfig:
    """Certificates from files. A server needs cert+key (and a CA to require client certs);
    a client needs the CA (and cert+key for mutual TLS)."""

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    server_name: str | None = None  # override the name checked against the server certificate

    @staticmethod
    def _read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    def server_credentials(self) -> grpc.ServerCredentials:
        if not (self.cert_file and self.key_file):
            raise ValueError("a TLS server needs cert_file and key_file")
        ca = self._read(self.ca_file)
        return grpc.ssl_server_credentials(
            [(self._read(self.key_file), self._read(self.cert_file))],
            root_certificates=ca, require_client_auth=ca is not None and bool(self.cert_file),
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.ca_file),
            private_key=self._read(self.key_file), certificate_chain=self._read(self.cert_file),
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
