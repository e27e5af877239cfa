"""Built-in HTTPS for the HTTP API: TLS >= 1.2 with the BCP 195 (RFC 9325) cipher suites.

The same floor as the DICOM side (:mod:`dicom_node.tls`), without client certificates: HTTP
clients authenticate with tokens or passwords (:mod:`dicom_node.api.auth`).
"""

from __future__ import annotations

import ssl

from dicom_node.errors import ConfigError
from dicom_node.settings import HttpSettings

BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"
"""TLS 1.2 suites RFC 9325 section 4.2 recommends: forward secrecy and AEAD only. TLS 1.3 suites
are all acceptable and are not affected by this list."""


def http_ssl_context(http: HttpSettings) -> ssl.SSLContext:
    """The server context for ``http.tls_certificate`` / ``http.tls_private_key``."""
    if http.tls_certificate is None or http.tls_private_key is None:
        raise ValueError("http_ssl_context() called without http.tls_certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(str(http.tls_certificate), str(http.tls_private_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"http: cannot load the TLS certificate/private key ({type(exc).__name__}: {exc})"
        ) from None
    return ctx
