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
    from tests.peers import wait_until

    wait_until(lambda: receiver.active_associations == 0, 10, message="associations closed")
