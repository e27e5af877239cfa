"""What the listener checks in a PDU header before it reads, or allocates, the rest.

pynetdicom 3.0 reads the 6-byte header of a PDU (type, reserved, 32-bit length) and then asks the
socket for that many bytes at once: a peer announcing ``01 00 ff ff ff ff`` made a receiver
allocate 4 GiB before anything had looked at who it was. :func:`check_header` bounds the length
by PDU type first; the reader (:mod:`dicom_node.scp.reactor`) then grows its buffer only as bytes
really arrive, and answers a refused header with :func:`abort_pdu` (PS3.8 9.3.8).
"""

from __future__ import annotations

import struct

HEADER_LENGTH = 6

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

ASSOCIATION_PDU_MAX = 1024**2
"""Largest A-ASSOCIATE-RQ/AC accepted (bytes after the header).

A real request stays far below: 128 presentation contexts (the most PS3.8 9.3.2.2 allows, odd
IDs 1-255) of one abstract syntax and 20 transfer syntaxes of 64 characters each come to
~185 KB; role selection and extended negotiation for each add ~20 KB, and a user identity
(PS3.7 D.3.3.7) at most 2 x 64 KiB. 1 MiB leaves room for all of that at once, and it is held
only as a peer really sends it, on a connection count that is capped."""

UNLIMITED_PDATA_CAP = 16 * 1024**2
"""P-DATA-TF cap when ``scp.max_pdu_size`` is 0 (no maximum advertised). dcm4che's PDUDecoder
refuses every PDU over the same 16 MiB; splitting into PDUs costs senders nothing."""

FIXED_LENGTH = 4
"""A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT have a 4-byte variable part (PS3.8 9.3.4-9.3.8)."""

READ_CHUNK = 256 * 1024
"""Most bytes the reader allocates ahead of their arrival. A whole default 128 KiB P-DATA-TF
still fits one ``recv_into`` buffer; a longer PDU's buffer doubles as it fills."""

# A-ABORT source and reasons, PS3.8 Table 9-26
ABORT_SOURCE_PROVIDER = 0x02
REASON_UNRECOGNIZED_PDU = 0x01
REASON_INVALID_PARAMETER_VALUE = 0x06

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 Table 9-21
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
"""rejected-transient, service-provider (presentation related), local-limit-exceeded"""

_LIMITS = {
    A_ASSOCIATE_RQ: ASSOCIATION_PDU_MAX,
    A_ASSOCIATE_AC: ASSOCIATION_PDU_MAX,
    A_ASSOCIATE_RJ: FIXED_LENGTH,
    A_RELEASE_RQ: FIXED_LENGTH,
    A_RELEASE_RP: FIXED_LENGTH,
    A_ABORT: FIXED_LENGTH,
}


class PduRefused(Exception):
    """A PDU header we do not read past; ``reason`` is the A-ABORT reason to send."""

    def __init__(self, message: str, reason: int) -> None:
        super().__init__(message)
        self.reason = reason


def pdata_cap(max_pdu_size: int) -> int:
    """Largest P-DATA-TF length we accept: what we advertised (PS3.8 D.1: the maximum length
    of the variable field), or :data:`UNLIMITED_PDATA_CAP` when we advertised none."""
    return max_pdu_size if max_pdu_size > 0 else UNLIMITED_PDATA_CAP


def check_header(header: bytes | bytearray, *, max_pdata: int) -> tuple[int, int]:
    """The (PDU type, length) of a 6-byte PDU header, or :class:`PduRefused`.

    Unknown types are "unrecognized PDU"; a length over the type's cap (``max_pdata`` for
    P-DATA-TF, see :func:`pdata_cap`) or a fixed-length PDU of another length is "invalid PDU
    parameter value" (PS3.8 9.3.8).
    """
    if len(header) != HEADER_LENGTH:
        raise ValueError("a PDU header is 6 bytes")
    pdu_type, _, length = struct.unpack(">BBL", header)
    if pdu_type == P_DATA_TF:
        cap = max_pdata
    elif pdu_type in _LIMITS:
        cap = _LIMITS[pdu_type]
    else:
        raise PduRefused(f"unknown PDU type 0x{pdu_type:02X}", REASON_UNRECOGNIZED_PDU)
    if length > cap or (cap == FIXED_LENGTH and length != FIXED_LENGTH):
        raise PduRefused(
            f"PDU type 0x{pdu_type:02X} announces {length} bytes, "
            + (f"must be {cap}" if cap == FIXED_LENGTH else f"limit {cap}"),
            REASON_INVALID_PARAMETER_VALUE,
        )
    return pdu_type, length


def abort_pdu(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider with ``reason`` (PS3.8 9.3.8)."""
    return struct.pack(">BBLBBBB", A_ABORT, 0, 4, 0, 0, ABORT_SOURCE_PROVIDER, reason)


def associate_rj_pdu(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return struct.pack(">BBLBBBB", A_ASSOCIATE_RJ, 0, 4, 0, result, source, reason)
