"""C-STORE write-back into real peers: Orthanc (with C-FIND read-back), DCMTK storescp, and a
pynetdicom archive that answers "duplicate" (0111) -- every status checked and classified."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from dicom_node.delivery import (
    CStoreDestination,
    Verdict,
    build_destination,
    deliver,
    echo_destination,
)
from dicom_node.errors import PermanentDeliveryError, TransientDeliveryError
from dicom_node.settings import DestinationSettings
from tests.delivery_peers import foreign_copy, orthanc_copies, result_objects, sop_uid_of
from tests.peers import Orthanc, StoreSCP, free_port

NODE_AET = "AINODE"


def cstore_to(aet: str, port: int, **settings: Any) -> CStoreDestination:
    cfg = DestinationSettings(url=f"dicom://{aet}@127.0.0.1:{port}", **settings)
    dest = build_destination("pacs", cfg, calling_ae_title=NODE_AET)
    assert isinstance(dest, CStoreDestination)
    return dest


def same_dataset(received: Path, ours: Path) -> bool:
    """The peer rewrites the file meta header; the dataset itself must be ours, unchanged."""
    return pydicom.dcmread(received) == pydicom.dcmread(ours)


@pytest.fixture
def results(tmp_path: Path) -> list[Path]:
    return result_objects(tmp_path / "results")


@pytest.fixture
def orthanc_knows_node(clean_orthanc: Orthanc) -> Iterator[Orthanc]:
    """Orthanc answers C-FIND only from registered modalities (DicomAlwaysAllowFind is false)."""
    clean_orthanc.add_modality("ainode", NODE_AET, free_port())
    yield clean_orthanc
    clean_orthanc.delete("/modalities/ainode")


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "storescp").start()
    yield scp
    scp.stop()


def test_cstore_into_orthanc_with_c_find_read_back(
    orthanc_knows_node: Orthanc, results: list[Path]
) -> None:
    orthanc = orthanc_knows_node
    dest = cstore_to(orthanc.aet, orthanc.dicom_port)

    report = deliver(dest, results, verify=True)

    assert report.delivered and report.verified and report.kind == "cstore"
    assert [o.status for o in report.outcomes] == [0x0000, 0x0000]
    assert orthanc_copies(orthanc, results) == {sop_uid_of(p): 1 for p in results}
    # Resending the same files: still one copy of each.
    assert deliver(dest, results, verify=True).delivered
    assert len(orthanc.get("/instances").json()) == len(results)


def test_read_back_without_query_permission_is_never_counted_as_verified(
    clean_orthanc: Orthanc, results: list[Path]
) -> None:
    # An AE title Orthanc does not know: it may store (DicomAlwaysAllowStore) but not query.
    dest = cstore_to(clean_orthanc.aet, clean_orthanc.dicom_port, calling_ae_title="STRANGER")
    with pytest.raises(
        (TransientDeliveryError, PermanentDeliveryError), match="read-back by C-FIND"
    ):
        deliver(dest, results, verify=True)
    assert len(clean_orthanc.get("/instances").json()) == len(results)  # the store itself worked


def test_echo_destination(orthanc_knows_node: Orthanc) -> None:
    assert echo_destination(cstore_to(orthanc_knows_node.aet, orthanc_knows_node.dicom_port)) < 30
    with pytest.raises(TransientDeliveryError, match="C-ECHO"):
        echo_destination(cstore_to("NOBODY", free_port(), timeout=3))


def test_cstore_into_storescp(storescp: StoreSCP, results: list[Path]) -> None:
    report = deliver(cstore_to(storescp.aet, storescp.port), results, verify=False)

    assert report.delivered and not report.verified
    received = storescp.received
    assert len(received) == len(results)
    by_uid = {sop_uid_of(p): p for p in received}
    assert all(same_dataset(by_uid[sop_uid_of(p)], p) for p in results)


def test_read_back_against_a_peer_without_c_find_is_a_permanent_error(
    storescp: StoreSCP, results: list[Path]
) -> None:
    with pytest.raises(PermanentDeliveryError, match="C-FIND") as err:
        deliver(cstore_to(storescp.aet, storescp.port, read_back=True), results)
    assert "read_back off" in str(err.value)


def test_a900_from_storescp_is_permanent(
    tmp_path: Path, storescp: StoreSCP, results: list[Path]
) -> None:
    # The file's meta header names another SOP instance than its dataset: storescp answers A900.
    ds = pydicom.dcmread(results[1])
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    broken = tmp_path / "broken-sr.dcm"
    ds.save_as(broken)

    with pytest.raises(PermanentDeliveryError, match="0xA900") as err:
        deliver(cstore_to(storescp.aet, storescp.port), [results[0], broken])
    report = err.value.report  # type: ignore[attr-defined]
    assert [o.verdict for o in report.outcomes] == [Verdict.STORED, Verdict.PERMANENT]


def test_a700_from_storescp_is_transient_and_a_retry_delivers(
    storescp: StoreSCP, results: list[Path]
) -> None:
    out = storescp.workdir / "received"
    shutil.rmtree(out)  # storescp cannot write: it answers A700 (out of resources)
    dest = cstore_to(storescp.aet, storescp.port)

    with pytest.raises(TransientDeliveryError, match="0xA700"):
        deliver(dest, results)

    out.mkdir()  # the disk is back
    assert deliver(dest, results).delivered
    assert sorted(sop_uid_of(p) for p in storescp.received) == sorted(
        sop_uid_of(p) for p in results
    )


def test_refused_sop_class_is_permanent(
    tmp_path: Path, storescp: StoreSCP, results: list[Path]
) -> None:
    private = foreign_copy(
        results[1], tmp_path / "private.dcm", SOPClassUID="1.2.826.0.1.3680043.8.498.77"
    )
    ds = pydicom.dcmread(private)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.save_as(private)

    with pytest.raises(PermanentDeliveryError, match="does not accept this SOP class"):
        deliver(cstore_to(storescp.aet, storescp.port), [private])
    assert storescp.received == []


# -- an archive that answers "duplicate" --------------------------------------------------------


class DuplicateRefusingArchive:
    """A pynetdicom storage + C-FIND SCP that answers 0111 (Duplicate SOP Instance) for an instance
    it already holds, like archives configured to refuse resends. Neither Orthanc nor storescp can
    be told to do that, so this one is built from pynetdicom's real SCP."""

    def __init__(self) -> None:
        self.port = free_port()
        self.held: dict[str, Dataset] = {}
        self.stores = 0
        self.server: Any = None

    def start(self) -> DuplicateRefusingArchive:
        ae = AE(ae_title="ARCHIVE")
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_C_FIND, self._find)],
        )
        return self

    def stop(self) -> None:
        self.server.shutdown()

    def _store(self, event: Any) -> int:
        self.stores += 1
        ds = event.dataset
        uid = str(ds.SOPInstanceUID)
        if uid in self.held:
            return 0x0111
        self.held[uid] = ds
        return 0x0000

    def _find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        for ds in self.held.values():
            if any(
                query.get(k) and str(query.get(k)) != str(ds.get(k))
                for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
            ):
                continue
            answer = Dataset()
            answer.QueryRetrieveLevel = "IMAGE"
            for elem in query:
                if elem.keyword and elem.keyword != "QueryRetrieveLevel":
                    setattr(answer, elem.keyword, ds.get(elem.keyword, ""))
            yield 0xFF00, answer
        yield 0x0000, None


@pytest.fixture
def archive() -> Iterator[DuplicateRefusingArchive]:
    server = DuplicateRefusingArchive().start()
    yield server
    server.stop()


def test_duplicate_status_for_our_object_counts_as_delivered(
    archive: DuplicateRefusingArchive, results: list[Path]
) -> None:
    dest = cstore_to("ARCHIVE", archive.port)
    assert deliver(dest, results).delivered
    assert archive.stores == 2

    report = deliver(dest, results)  # the resend meets 0111 twice

    assert archive.stores == 4
    assert [(o.verdict, o.status) for o in report.outcomes] == [(Verdict.DUPLICATE, 0x0111)] * 2
    assert all("already there is ours" in o.detail for o in report.outcomes)


def test_duplicate_status_for_someone_elses_object_is_permanent(
    tmp_path: Path, archive: DuplicateRefusingArchive, results: list[Path]
) -> None:
    theirs = pydicom.dcmread(
        foreign_copy(results[0], tmp_path / "theirs.dcm", SeriesDescription="Manual contours")
    )
    archive.held[str(theirs.SOPInstanceUID)] = theirs

    with pytest.raises(PermanentDeliveryError, match="differs in SeriesDescription") as err:
        deliver(cstore_to("ARCHIVE", archive.port), results)

    assert "Manual contours" not in str(err.value)
    report = err.value.report  # type: ignore[attr-defined]
    assert [o.verdict for o in report.outcomes] == [Verdict.PERMANENT, Verdict.STORED]
    assert archive.held[str(theirs.SOPInstanceUID)].SeriesDescription == "Manual contours"


# -- DICOM TLS ------------------------------------------------------------------------------------


def test_cstore_over_tls_verifies_the_peer_certificate(tmp_path: Path, results: list[Path]) -> None:
    import trustme

    ca, other_ca = trustme.CA(), trustme.CA()
    server, client = ca.issue_cert("127.0.0.1"), ca.issue_cert("ainode.example")
    files = {
        "server.key": server.private_key_pem,
        "server.pem": server.cert_chain_pems[0],
        "client.key": client.private_key_pem,
        "client.pem": client.cert_chain_pems[0],
        "ca.pem": ca.cert_pem,
        "other-ca.pem": other_ca.cert_pem,
    }
    for name, blob in files.items():
        blob.write_to_path(str(tmp_path / name))
    # storescp requires TLS >= 1.2 (BCP 195 non-downgrading) and a client certificate from our CA.
    scp = StoreSCP(
        tmp_path / "storescp",
        flags=[
            "+tls",
            str(tmp_path / "server.key"),
            str(tmp_path / "server.pem"),
            "+cf",
            str(tmp_path / "ca.pem"),
        ],
    ).start()

    def over_tls(trusted: str) -> CStoreDestination:
        tls = {
            "enabled": True,
            "certificate": tmp_path / "client.pem",
            "private_key": tmp_path / "client.key",
            "ca_certificates": tmp_path / trusted,
        }
        return cstore_to(scp.aet, scp.port, tls=tls, timeout=5)

    try:
        # A server certificate from a CA we were not told to trust: permanent, nothing sent.
        with pytest.raises(PermanentDeliveryError, match="certificate is not trusted"):
            deliver(over_tls("other-ca.pem"), results)
        with pytest.raises(PermanentDeliveryError, match="certificate is not trusted"):
            echo_destination(over_tls("other-ca.pem"))
        assert scp.received == []

        assert echo_destination(over_tls("ca.pem")) < 30
        assert deliver(over_tls("ca.pem"), results).delivered
        assert len(scp.received) == len(results)
    finally:
        scp.stop()
