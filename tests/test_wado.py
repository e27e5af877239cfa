"""WADO-RS and QIDO-RS on a real ``dicom-node serve``, read with dicomweb-client (the client the
remote worker uses): instances, series and studies come back exactly as stored."""

from __future__ import annotations

import json
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian
from requests.exceptions import HTTPError
from sqlalchemy import select

from dicom_node.state import Database, Instance
from tests.dicomgen import ct_series
from tests.peers import NodeProcess, storescu, wait_until

TOKEN = "wado-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ANY_TS = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def parts_of(response: requests.Response) -> list[tuple[str | None, bytes]]:
    """(transfer-syntax parameter, payload) of each part of a multipart response, parsed with
    the standard library's MIME parser."""
    head = f"Content-Type: {response.headers['Content-Type']}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + response.content)
    assert message.is_multipart()
    out = []
    for part in message.iter_parts():
        assert part.get_content_type() == "application/dicom"
        out.append((part.get_param("transfer-syntax"), part.get_payload(decode=True)))
    return out


def test_wado_and_qido_with_dicomweb_client(tmp_path: Path, database_url: str) -> None:
    node = NodeProcess(
        tmp_path / "var",
        {
            "DICOM_NODE_DATABASE_URL": database_url,
            "DICOM_NODE_WORKER__EMBEDDED_WORKERS": "0",
            "DICOM_NODE_HTTP__TOKENS": json.dumps([TOKEN]),
        },
    ).start()
    db = Database(database_url)
    try:
        base = f"http://127.0.0.1:{node.http_port}/dicom-web"
        wait_until(lambda: requests.get(base.replace("/dicom-web", "/healthz"), timeout=5).ok, 30, message="healthz")
        series_a = ct_series(tmp_path / "a", slices=4, size=32)
        study = str(dcmread(series_a[0]).StudyInstanceUID)
        # A second series of the same study in Implicit VR Little Endian, sent by STOW-RS.
        series_b = ct_series(tmp_path / "b", slices=2, size=32, study_uid=study, seed=3, description="SECOND")
        for path in series_b:
            ds = dcmread(path)
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            ds.save_as(path, enforce_file_format=True)
        assert storescu(node.dicom_port, series_a).returncode == 0
        client = DICOMwebClient(base, headers=AUTH)
        client.store_instances([dcmread(p) for p in series_b], study_instance_uid=study)

        with db.session() as s:
            rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
        assert len(rows) == 6
        spool = node.data_dir / "spool"
        a0 = dcmread(series_a[0])
        series_a_uid, series_b_uid = str(a0.SeriesInstanceUID), str(dcmread(series_b[0]).SeriesInstanceUID)

        # One instance, as the remote worker asks for it: the dataset as stored, pixels included.
        got = client.retrieve_instance(study, series_a_uid, str(a0.SOPInstanceUID), media_types=(("application/dicom", "*"),))
        stored = dcmread(spool / rows[str(a0.SOPInstanceUID)].path)
        assert got == stored
        assert got.PixelData == stored.PixelData
        assert got.file_meta.TransferSyntaxUID == stored.file_meta.TransferSyntaxUID
        # dicomweb-client's default (Explicit VR Little Endian) works for an instance stored so.
        assert client.retrieve_instance(study, series_a_uid, str(a0.SOPInstanceUID)) == stored

        # Byte for byte, with the transfer syntax named on the part.
        url = f"{base}/studies/{study}/series/{series_a_uid}/instances/{a0.SOPInstanceUID}"
        r = requests.get(url, headers={**AUTH, "Accept": ANY_TS}, timeout=30)
        assert r.status_code == 200
        ((transfer_syntax, payload),) = parts_of(r)
        assert payload == (spool / rows[str(a0.SOPInstanceUID)].path).read_bytes()
        assert transfer_syntax == stored.file_meta.TransferSyntaxUID

        # Series and study level.
        got_a = client.retrieve_series(study, series_a_uid, media_types=(("application/dicom", "*"),))
        assert sorted(d.SOPInstanceUID for d in got_a) == sorted(str(dcmread(p).SOPInstanceUID) for p in series_a)
        r = requests.get(f"{base}/studies/{study}", headers={**AUTH, "Accept": ANY_TS}, timeout=30)
        assert r.status_code == 200
        payloads = [payload for _, payload in parts_of(r)]
        assert sorted(payloads) == sorted((spool / row.path).read_bytes() for row in rows.values())
        got_b = client.retrieve_series(study, series_b_uid, media_types=(("application/dicom", "*"),))
        assert {d.file_meta.TransferSyntaxUID for d in got_b} == {ImplicitVRLittleEndian}

        # The node never transcodes: asking for another transfer syntax than stored is 406.
        r = requests.get(f"{base}/studies/{study}/series/{series_b_uid}", headers={**AUTH, "Accept": 'multipart/related; type="application/dicom"'}, timeout=30)
        assert r.status_code == 406
        r = requests.get(
            f"{base}/studies/{study}/series/{series_b_uid}",
            headers={**AUTH, "Accept": f'multipart/related; type="application/dicom"; transfer-syntax={ImplicitVRLittleEndian}'},
            timeout=30,
        )
        assert r.status_code == 200 and len(parts_of(r)) == 2
        assert requests.get(url, headers={**AUTH, "Accept": "image/jpeg"}, timeout=30).status_code == 406

        # Metadata: headers without pixel data, one per instance.
        meta = client.retrieve_series_metadata(study, series_a_uid)
        assert len(meta) == 4
        by_uid = {m["00080018"]["Value"][0]: m for m in meta}
        first = by_uid[str(a0.SOPInstanceUID)]
        assert "7FE00010" not in first
        assert first["00100010"]["Value"][0]["Alphabetic"] == str(stored.PatientName)
        assert first["00200032"]["Value"] == [float(v) for v in stored.ImagePositionPatient]
        assert first["00020010"]["Value"] == [stored.file_meta.TransferSyntaxUID]
        assert len(client.retrieve_study_metadata(study)) == 6
        assert client.retrieve_instance_metadata(study, series_a_uid, str(a0.SOPInstanceUID))["00080018"]["Value"] == [str(a0.SOPInstanceUID)]

        # QIDO-RS.
        studies = client.search_for_studies()
        assert [s["0020000D"]["Value"][0] for s in studies] == [study]
        assert studies[0]["00201208"]["Value"] == [6] and studies[0]["00080061"]["Value"] == ["CT"]
        series = client.search_for_series(study)
        assert sorted(s["0020000E"]["Value"][0] for s in series) == sorted([series_a_uid, series_b_uid])
        found = client.search_for_instances(study, series_a_uid)
        assert sorted(i["00080018"]["Value"][0] for i in found) == sorted(str(dcmread(p).SOPInstanceUID) for p in series_a)
        assert len(client.search_for_instances(study)) == 6

        # Unknown or malformed UIDs.
        with pytest.raises(HTTPError) as missing:
            client.retrieve_instance(study, series_a_uid, "1.2.3.4", media_types=(("application/dicom", "*"),))
        assert missing.value.response.status_code == 404
        r = requests.get(f"{base}/studies/..%2F..%2Fetc", headers={**AUTH, "Accept": ANY_TS}, timeout=30)
        assert r.status_code in (400, 404)
        # Without credentials: 401, also for the remote worker's request.
        assert requests.get(url, headers={"Accept": ANY_TS}, timeout=30).status_code == 401
        log = node.log()
        assert study not in log and "PHICANARY" not in log
    finally:
        db.dispose()
        node.stop()
