"""The listener's speed-ups keep pynetdicom's behaviour: same bytes on the wire, same
association life cycle (checked here directly; every other SCP test runs through them too)."""

from __future__ import annotations

from typing import Any

import pytest
from pynetdicom.dimse import _RSP_TO_MESSAGE
from pynetdicom.dimse_primitives import C_STORE

from dicom_node.scp import reactor
from tests.scp_support import associate


@pytest.mark.parametrize(
    ("status", "sop"),
    [(0x0000, "1.2.3.4"), (0xA700, "1.2.840.113619.2.55.3.604688119.123"), (0xC002, "1.2.3"), (0x0111, "9" * 64)],
)
def test_c_store_rsp_bytes_equal_pynetdicoms(status: int, sop: str) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    primitive.AffectedSOPInstanceUID = sop
    primitive.Status = status
    message = _RSP_TO_MESSAGE[C_STORE]()
    message.primitive_to_message(primitive)
    (pdata,) = list(message.encode_msg(1, 131072))
    (_, expected), = pdata.presentation_data_value_list
    assert b"\x03" + reactor.encode_c_store_rsp(7, "1.2.840.10008.5.1.4.1.1.2", sop, status) == expected


def test_associations_use_the_node_classes_and_close_cleanly(receiver: Any) -> None:
    assert reactor.supported(), "pynetdicom version changed: review dicom_node/scp/reactor.py"
    from tests.peers import wait_until

    port = int(receiver.server.server_address[1])
    for _ in range(3):
        assoc = associate(port)
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        (server_side,) = [a for a in receiver.server.active_associations if a.is_alive()]
        assert isinstance(server_side, reactor.NodeAssociation)
        assert isinstance(server_side.dul, reactor.NodeDUL)
        assert isinstance(server_side.dimse, reactor.NodeDIMSE)
        assoc.release()
        assert assoc.is_released
        # The server side ends on its own thread just after the release: wait for it, so the
        # next round sees only its own association (on a loaded machine it can lag a little).
        wait_until(lambda a=server_side: not a.is_alive(), 10, message="server side closed")
    wait_until(lambda: receiver.active_associations == 0, 10, message="associations closed")


@pytest.mark.parametrize(
    ("header", "verdict"),
    [
        ("0100 00100000", (0x01, 0x100000)),  # A-ASSOCIATE-RQ up to 1 MiB
        ("0100 00100001", 0x06),
        ("0400 00020000", (0x04, 0x20000)),  # P-DATA-TF up to the advertised 128 KiB
        ("0400 00020001", 0x06),
        ("0400 ffffffff", 0x06),
        ("0500 00000004", (0x05, 4)),  # release and abort: exactly 4
        ("0500 00000005", 0x06),
        ("0700 00000000", 0x06),
        ("0000 00000004", 0x01),  # unknown types
        ("0800 00000004", 0x01),
        ("4745 54202f20", 0x01),  # "GET / "
    ],
)
def test_pdu_header_is_checked_before_the_body(header: str, verdict: Any) -> None:
    from dicom_node.scp import wire

    raw = bytes.fromhex(header)
    if isinstance(verdict, tuple):
        assert wire.check_header(raw, max_pdata=wire.pdata_cap(131072)) == verdict
    else:
        with pytest.raises(wire.PduRefused) as refused:
            wire.check_header(raw, max_pdata=wire.pdata_cap(131072))
        assert refused.value.reason == verdict
        assert wire.abort_pdu(verdict) == bytes([7, 0, 0, 0, 0, 4, 0, 0, 2, verdict])


def test_unlimited_pdu_size_still_has_a_cap() -> None:
    from dicom_node.scp import wire

    assert wire.pdata_cap(0) == 16 * 2**20
    with pytest.raises(wire.PduRefused):
        wire.check_header(bytes.fromhex("0400 01000001"), max_pdata=wire.pdata_cap(0))


def test_an_unsupported_pynetdicom_refuses_to_start(
    make_settings: Any, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the hardened reader (another pynetdicom) the listener does not start at all."""
    import pynetdicom

    from dicom_node.errors import DicomNodeError
    from dicom_node.scp.server import Receiver
    from dicom_node.state import open_database

    settings = make_settings(database_url=sqlite_url, scp={"receivers": 1})
    db = open_database(settings.resolved_database_url)
    try:
        monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
        with pytest.raises(DicomNodeError, match=r"pynetdicom 3\.1\.0 is not supported"):
            Receiver(settings, db, reuse_port=False).start()
    finally:
        db.dispose()
