"""The test harness itself: each real peer starts on loopback and answers."""

from __future__ import annotations

from tests.peers import Orthanc, RedisServer, listeners_of


def test_orthanc_runs_on_loopback_with_dicomweb(orthanc: Orthanc) -> None:
    assert orthanc.proc is not None
    addrs = listeners_of(orthanc.proc.pid)
    assert addrs and all(a.startswith("127.0.0.1:") for a in addrs), addrs
    assert orthanc.get("/system").json()["DicomAet"] == "ORTHANC"
    assert "dicom-web" in orthanc.get("/plugins").json()
    # QIDO answers (empty or not), and authentication is enforced.
    assert orthanc.get("/dicom-web/studies").status_code in (200, 204)
    import requests

    assert requests.get(orthanc.url + "/system", timeout=10).status_code == 401


def test_redis_server_can_be_killed_and_restarted(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.set("k", "v")
    assert client.get("k") == b"v"
    redis_server.restart()
    assert redis_server.client().get("k") is None  # no persistence: restarted empty
    assert all(a.startswith("127.0.0.1:") for a in listeners_of(redis_server.proc.pid))
