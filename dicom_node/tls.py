"""DICOM TLS contexts (PS3.15 Annex B, BCP 195 non-downgrading profile) from :class:`TlsSettings`.

Both sides use TLS 1.2 or newer, certificates from PEM files, and the configured CA bundle as
the trust list (a per-site list, not the system store: hospitals run their own CAs).

* The listener (:func:`server_ssl_context`) requires a client certificate signed by a trusted
  CA unless ``require_peer_certificate`` is off. Certificates, not AE titles, authenticate peers.
* The SCU (:func:`client_ssl_context`) checks the server's certificate and its host name, and
  presents the node's certificate for mutual authentication.
"""

from __future__ import annotations

import ssl

from dicom_node.errors import ConfigError
from dicom_node.settings import TlsSettings


def _load_chain(ctx: ssl.SSLContext, tls: TlsSettings, what: str) -> None:
    try:
        ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{what}: cannot load the TLS certificate/private key ({type(exc).__name__}: {exc})"
        ) from None


def _load_cas(ctx: ssl.SSLContext, tls: TlsSettings, what: str) -> None:
    try:
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{what}: cannot load the TLS CA certificates ({type(exc).__name__}: {exc})"
        ) from None


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """TLS for the C-STORE listener: TLS >= 1.2, our certificate, client certificates checked
    against ``tls.ca_certificates`` (required unless ``require_peer_certificate`` is off)."""
    if not tls.enabled:
        raise ValueError("server_ssl_context() called with TLS disabled")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, tls, "scp.tls")
    _load_cas(ctx, tls, "scp.tls")
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_peer_certificate else ssl.CERT_OPTIONAL
    return ctx


def client_ssl_context(tls: TlsSettings, server_hostname: str | None = None) -> ssl.SSLContext:
    """TLS for a C-STORE SCU (write-back, ``dicom-node send``): TLS >= 1.2, the server's
    certificate checked against ``tls.ca_certificates`` *and* its host name, our certificate
    presented when configured.

    Pass the returned context and the host name the server's certificate must carry as
    ``Peer(tls=ctx, server_hostname=...)``. ``server_hostname``, when given, is only checked
    here to be non-empty: the name is verified during the handshake, by ``ssl``.
    """
    if not tls.enabled:
        raise ValueError("client_ssl_context() called with TLS disabled")
    if server_hostname is not None and not server_hostname.strip():
        raise ConfigError("TLS needs the server's host name to verify its certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname on
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_cas(ctx, tls, "destination tls")
    if tls.certificate and tls.private_key:
        _load_chain(ctx, tls, "destination tls")
    return ctx
