"""TLS credentials for the ports the gateway serves and the channels it opens, built from config in one place."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from server.config import ChannelTLSConfig, ListenTLSConfig, check_tls_files

log = logging.getLogger("shadowserve.transport")


def _read(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes()


class _CertificateFiles:
    """A port's certificate files; gRPC asks on every handshake and gets a new configuration once they change."""

    def __init__(self, tls: ListenTLSConfig) -> None:
        self.tls = tls
        self.contents = self._contents()

    def _contents(self) -> tuple[bytes | None, ...]:
        return tuple(_read(path) for path in (self.tls.key_file, self.tls.cert_file, self.tls.client_ca_file))

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        key, cert, client_ca = self.contents
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            contents = self._contents()
            if contents == self.contents:
                return None
            check_tls_files(self.tls.cert_file, self.tls.key_file, self.tls.client_ca_file)
        except (OSError, ValueError) as exc:  # mid-rotation: a file missing, or a key not matching its certificate yet
            log.warning("TLS files of %s not usable now (%s); keeping the certificate in use", self.tls.cert_file, exc)
            return None
        self.contents = contents
        log.info("TLS files of %s changed: new handshakes use them", self.tls.cert_file)
        return self.configuration()


def server_credentials(tls: ListenTLSConfig) -> grpc.ServerCredentials:
    """TLS on a served port; client certificates are required when `client_ca_file` is set (mTLS)."""
    files = _CertificateFiles(tls)
    return grpc.dynamic_ssl_server_credentials(
        files.configuration(), files, require_client_authentication=tls.client_ca_file is not None)


def add_port(server: grpc.aio.Server, listen: str, tls: ListenTLSConfig | None) -> int:
    """Bind `listen` with TLS when configured; returns the bound port (0 when binding failed)."""
    if tls is None:
        return server.add_insecure_port(listen)
    return server.add_secure_port(listen, server_credentials(tls))


def channel_credentials(tls: ChannelTLSConfig) -> grpc.ChannelCredentials:
    """TLS towards a backend, with a client certificate when one is configured."""
    return grpc.ssl_channel_credentials(_read(tls.ca_file), _read(tls.key_file), _read(tls.cert_file))


def open_channel(url: str, tls: ChannelTLSConfig | None, options: list[tuple[str, object]]) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(url, options=options)
    return grpc.aio.secure_channel(url, channel_credentials(tls), options=options)
