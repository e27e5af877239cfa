#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris) of the PDU path a hostile peer reaches before any handler.

What one input goes through, as in the receiver (``dicom_node/scp/reactor.py``):

1. our header check, :func:`dicom_node.scp.wire.check_header` (type and announced length);
2. pynetdicom's PDU decoder for that type (``pdu.decode``), as ``DULServiceProvider._decode_pdu``;
3. the PDU's ``to_primitive()``, as the state machine's actions do (AE-6, DT-2, AR-2, AA-3);
4. for P-DATA-TF, pynetdicom's DIMSE message decoder (``DIMSEMessage.decode_msg``), as
   ``DIMSEServiceProvider.receive_primitive`` does with each P-DATA primitive.

An ``Exception`` raised by steps 2-4 is handled by the receiver (Evt19, or the state machine
drops the connection), so it is not a finding. Findings are what the receiver cannot handle:
a header we accept over its cap, an input that takes longer than ``--timeout`` seconds, memory
over ``--rss-limit-mb``, or a ``BaseException`` that is not an ``Exception``.

Usage::

    .venv/bin/python scripts/fuzz_pdu.py --seconds 60            # needs the dev extra (atheris)
    .venv/bin/python scripts/fuzz_pdu.py --runs 10000 --work /tmp/pdu-corpus

Seeds: ``tests/fuzz_corpus/pdu``; the options are :mod:`atheris_runner`'s.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import cast

import atheris
from atheris_runner import run

with atheris.instrument_imports(include=["pynetdicom", "pydicom", "dicom_node"]):
    from pynetdicom import _config
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.dul import _PDU_TYPES
    from pynetdicom.pdu_primitives import P_DATA

    from dicom_node.scp import wire
    from dicom_node.settings import DEFAULT_MAX_PDU

REPO = Path(__file__).resolve().parent.parent
SEEDS = REPO / "tests" / "fuzz_corpus" / "pdu"


def one_input(data: bytes) -> None:
    """The fuzz target: one PDU as a peer would send it."""
    if len(data) < wire.HEADER_LENGTH:
        return  # the reader waits for the rest of the header until its deadline
    try:
        pdu_type, length = wire.check_header(data[:6], max_pdata=DEFAULT_MAX_PDU)
    except wire.PduRefused:
        return  # A-ABORT and close
    cap = DEFAULT_MAX_PDU if pdu_type == wire.P_DATA_TF else wire.ASSOCIATION_PDU_MAX
    if length > cap:
        raise AssertionError(f"header accepted over its cap: type {pdu_type:#x}, {length} bytes")
    if len(data) < 6 + length:
        return  # the reader waits for the rest until its deadline
    raw = bytes(data[: 6 + length])
    pdu_cls, _ = _PDU_TYPES[raw[0:1]]
    pdu = pdu_cls()
    try:
        pdu.decode(raw)
        primitive = pdu.to_primitive()
    except Exception:
        return  # Evt19 (decoder) or a dropped connection (state machine action)
    if pdu_type == wire.P_DATA_TF:
        message = DIMSEMessage()
        try:
            if message.decode_msg(cast(P_DATA, primitive)):
                message.message_to_primitive()
        except Exception:
            return  # the state machine drops the connection


# -- seeds -----------------------------------------------------------------------------------


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _associate_rq(contexts: list[tuple[int, str, list[str]]], extra_user: bytes = b"") -> bytes:
    items = _item(0x10, b"1.2.840.10008.3.1.1.1")
    for context_id, abstract, transfers in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, t.encode()) for t in transfers)
        items += _item(0x20, bytes([context_id, 0, 0, 0]) + sub)
    user = _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.99")
    items += _item(0x50, user + extra_user)
    body = struct.pack(">HH16s16s32s", 1, 0, b"AINODE".ljust(16), b"FUZZ".ljust(16), bytes(32))
    body += items
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _implicit(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, element, len(value)) + value


def _command(elements: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(_implicit(0x0000, e, v) for e, v in elements)
    return _implicit(0x0000, 0x0000, struct.pack("<I", len(body))) + body


def _p_data(context_id: int, fragment: bytes, header: int) -> bytes:
    pdv = struct.pack(">IBB", len(fragment) + 2, context_id, header) + fragment
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def seeds() -> dict[str, bytes]:
    """A handful of small, valid PDUs: what a real peer sends."""
    ct, implicit, explicit = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
    echo = _command(
        [
            (0x0002, b"1.2.840.10008.1.1\x00"),
            (0x0100, struct.pack("<H", 0x0030)),
            (0x0110, struct.pack("<H", 1)),
            (0x0800, struct.pack("<H", 0x0101)),
        ]
    )
    store = _command(
        [
            (0x0002, ct.encode()),
            (0x0100, struct.pack("<H", 0x0001)),
            (0x0110, struct.pack("<H", 7)),
            (0x0700, struct.pack("<H", 0)),
            (0x0800, struct.pack("<H", 0x0000)),
            (0x1000, b"1.2.3.4\x00"),
        ]
    )
    dataset = _implicit(0x0008, 0x0016, ct.encode()) + _implicit(0x0008, 0x0018, b"1.2.3.4\x00")
    identity = _item(
        0x58, bytes([2, 1]) + struct.pack(">H", 5) + b"alice" + struct.pack(">H", 3) + b"pw!"
    )
    return {
        "associate-rq-echo": _associate_rq([(1, "1.2.840.10008.1.1", [implicit])]),
        "associate-rq-ct-identity": _associate_rq(
            [(1, ct, [explicit, implicit]), (3, ct, [implicit])], identity
        ),
        "p-data-echo": _p_data(1, echo, 0x03),
        "p-data-store": _p_data(1, store, 0x03) + _p_data(1, dataset, 0x02),
        "release-rq": bytes.fromhex("05000000000400000000"),
        "abort": bytes.fromhex("07000000000400000206"),
    }


def main() -> None:
    _config.LOG_HANDLER_LEVEL = "none"  # no per-association event handlers
    run(
        "fuzz_pdu",
        __doc__,
        seed_folder=SEEDS,
        one_input=one_input,
        seeds=seeds,
        rss_limit_mb=1024,
        max_len=16384,
        quiet_loggers=("pynetdicom", "pydicom"),
    )


if __name__ == "__main__":
    main()
