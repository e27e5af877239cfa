"""Built-in HTTPS for the HTTP API: TLS >= 1.2 with the BCP 195 (RFC 9325) cipher suites.

The same floor as the DICOM side (:func:`dicom_node.tls.bcp195_context`), without client
certificates: HTTP clients authenticate with tokens or passwords (:mod:`dicom_node.api.auth`).
"""

from __future__ import annotations

import ssl

from dicom_node.settings import HttpSettings
from dicom_node.tls import bcp195_context, load_chain


def http_ssl_context(http: HttpSettings) -> ssl.SSLContext:
    """The server context for ``http.tls_certificate`` / ``http.tls_private_key``."""
    if http.tls_certificate is None or http.tls_private_key is None:
        raise ValueError("http_ssl_context() called without http.tls_certificate")
    ctx = bcp195_context(ssl.PROTOCOL_TLS_SERVER)
    load_chain(ctx, http.tls_certificate, http.tls_private_key, "http")
    return ctx
