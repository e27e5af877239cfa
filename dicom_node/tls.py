"""DICOM TLS contexts (PS3.15 Annex B, BCP 195 non-downgrading profile) from :class:`TlsSettings`.

Both sides use TLS 1.2 or newer, certificates from PEM files, and the configured CA bundle as
the trust list (a per-site list, not the system store: hospitals run their own CAs).

* The listener (:func:`server_ssl_context`) requires a client certificate signed by a trusted
  CA unless ``require_peer_certificate`` is off. Certificates, not AE titles, authenticate peers.
* The SCU (:func:`client_ssl_context`) checks the server's certificate and its host name, and
  presents the node's certificate for mutual authentication.

The HTTP API's built-in HTTPS (:mod:`dicom_node.api.https`) starts from the same
:func:`bcp195_context`.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from dicom_node.errors import ConfigError
from dicom_node.settings import TlsSettings

BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"
"""TLS 1.2 suites RFC 9325 section 4.2 recommends: forward secrecy and AEAD only. TLS 1.3 suites
are all acceptable and are not affected by this list."""


def bcp195_context(protocol: int) -> ssl.SSLContext:
    """A context (``ssl.PROTOCOL_TLS_SERVER`` or ``_CLIENT``) with the BCP 195 floor (PS3.15
    Annex B, RFC 9325): TLS >= 1.2, :data:`BCP195_CIPHERS` for TLS 1.2, no compression."""
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def load_chain(
    ctx: ssl.SSLContext, certificate: Path | None, private_key: Path | None, what: str
) -> None:
    """Load our PEM certificate chain and key; one that does not load is a :class:`ConfigError`
    naming the setting section ``what``."""
    try:
        ctx.load_cert_chain(str(certificate), str(private_key))
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
    """TLS for the C-STORE listener: the BCP 195 floor, our certificate, client certificates checked
    against ``tls.ca_certificates`` (required unless ``require_peer_certificate`` is off)."""
    if not tls.enabled:
        raise ValueError("server_ssl_context() called with TLS disabled")
    ctx = bcp195_context(ssl.PROTOCOL_TLS_SERVER)
    load_chain(ctx, tls.certificate, tls.private_key, "scp.tls")
    _load_cas(ctx, tls, "scp.tls")
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_peer_certificate else ssl.CERT_OPTIONAL
    return ctx


def client_ssl_context(tls: TlsSettings, server_hostname: str | None = None) -> ssl.SSLContext:
    """TLS for a C-STORE SCU (write-back, ``dicom-node send``): the BCP 195 floor, the server's
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
    ctx = bcp195_context(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname on
    _load_cas(ctx, tls, "destination tls")
    if tls.certificate and tls.private_key:
        load_chain(ctx, tls.certificate, tls.private_key, "destination tls")
    return ctx
