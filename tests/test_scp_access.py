"""Who may associate: calling-AE allow-list (optionally bound to hosts), called AE title,
maximum associations with slots freed after release and abort, and the ACSE timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.peers import wait_until
from tests.scp_support import associate, rejection, running_receiver

REJECTED_PERMANENT, REJECTED_TRANSIENT = 0x01, 0x02
SOURCE_SERVICE_USER = 0x01
CALLING_AE_NOT_RECOGNIZED, CALLED_AE_NOT_RECOGNIZED = 0x03, 0x07


@pytest.fixture
def settings_for(make_settings: Callable[..., Any], database_url: str) -> Callable[..., Any]:
    def build(**scp: Any) -> Any:
        return make_settings(database_url=database_url, scp={"receivers": 1, **scp})

    return build


def _port(rcv: Any) -> int:
    return int(rcv.server.server_address[1])


def _echo(assoc: Any) -> int:
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status)
    finally:
        assoc.release()


def test_allow_list_rejects_an_unknown_calling_ae_and_accepts_a_known_one(settings_for: Any) -> None:
    settings = settings_for(allowed_callers=[{"ae_title": "GOODSCU"}])
    with running_receiver(settings) as rcv:
        bad = associate(_port(rcv), calling="BADSCU")
        assert rejection(bad) == (REJECTED_PERMANENT, SOURCE_SERVICE_USER, CALLING_AE_NOT_RECOGNIZED)
        good = associate(_port(rcv), calling="GOODSCU")
        assert good.is_established
        assert _echo(good) == 0x0000
        # DCMTK sees the same rejection
        result = subprocess.run(
            ["echoscu", "-aet", "BADSCU", "-aec", "AINODE", "127.0.0.1", str(_port(rcv))],
            capture_output=True, text=True, timeout=60, env=dict(os.environ, TCP_NODELAY="1"),
        )
        assert result.returncode != 0
        assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
        wait_until(lambda: rcv.associations["rejected"] == 2, 10, message="2 rejections counted")
        assert rcv.associations["accepted"] == 1


def test_allow_list_bound_to_hosts(settings_for: Any) -> None:
    elsewhere = settings_for(allowed_callers=[{"ae_title": "GOODSCU", "hosts": ["10.0.0.0/8"]}])
    with running_receiver(elsewhere) as rcv:
        assoc = associate(_port(rcv), calling="GOODSCU")
        assert rejection(assoc) == (REJECTED_PERMANENT, SOURCE_SERVICE_USER, CALLING_AE_NOT_RECOGNIZED)
    here = settings_for(allowed_callers=[{"ae_title": "GOODSCU", "hosts": ["127.0.0.1", "10.0.0.0/8"]}])
    with running_receiver(here) as rcv:
        assoc = associate(_port(rcv), calling="GOODSCU")
        assert assoc.is_established
        assert _echo(assoc) == 0x0000


def test_empty_allow_list_accepts_nobody_and_no_allow_list_accepts_anyone(settings_for: Any) -> None:
    with running_receiver(settings_for(allowed_callers=[])) as rcv:
        assert rejection(associate(_port(rcv), calling="ANYONE")) is not None
    with running_receiver(settings_for()) as rcv:
        assoc = associate(_port(rcv), calling="ANYONE")
        assert assoc.is_established
        assert _echo(assoc) == 0x0000


def test_wrong_called_ae_title_is_rejected(settings_for: Any) -> None:
    with running_receiver(settings_for()) as rcv:
        assoc = associate(_port(rcv), called="NOTUS")
        assert rejection(assoc) == (REJECTED_PERMANENT, SOURCE_SERVICE_USER, CALLED_AE_NOT_RECOGNIZED)
    with running_receiver(settings_for(require_called_ae_title=False)) as rcv:
        assoc = associate(_port(rcv), called="NOTUS")
        assert assoc.is_established
        assert _echo(assoc) == 0x0000


def test_over_the_association_limit_is_rejected_transient_and_slots_come_back(settings_for: Any) -> None:
    with running_receiver(settings_for(max_associations=2)) as rcv:
        port = _port(rcv)
        first, second = associate(port), associate(port)
        assert first.is_established and second.is_established
        third = associate(port)
        result = rejection(third)
        assert result is not None and result[0] == REJECTED_TRANSIENT, result
        # released slot comes back
        first.release()

        def fourth_ok() -> bool:
            assoc = associate(port)
            if assoc.is_established:
                assoc.release()
                return True
            return False

        wait_until(fourth_ok, 10, 0.2, message="a slot after release")
        # aborted slot comes back too
        second.abort()
        both = []
        def two_ok() -> bool:
            for a in both:
                if a.is_established:
                    a.release()
            both.clear()
            both.extend([associate(port), associate(port)])
            ok = all(a.is_established for a in both)
            return ok

        wait_until(two_ok, 10, 0.2, message="both slots after abort")
        for a in both:
            if a.is_established:
                a.release()
        wait_until(lambda: rcv.active_associations == 0, 10, message="all associations closed")


def test_a_peer_that_connects_and_says_nothing_is_dropped(settings_for: Any) -> None:
    with running_receiver(settings_for(acse_timeout=1.0, network_timeout=2.0)) as rcv:
        with socket.create_connection(("127.0.0.1", _port(rcv)), timeout=15) as sock:
            started = time.monotonic()
            data = sock.recv(1024)  # blocks until the node drops us
            waited = time.monotonic() - started
        assert data in (b"",) or data[:1] == b"\x07", data  # closed, or A-ABORT
        assert waited < 10
        assoc = associate(_port(rcv))
        assert assoc.is_established
        assert _echo(assoc) == 0x0000
