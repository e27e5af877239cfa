"""STOW-RS write-back into a real Orthanc: byte-identical sends, resends, auth, TLS, conflicts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from dicom_node.delivery import (
    DestinationConfigError,
    StowDestination,
    Verdict,
    build_destination,
    deliver,
    echo_destination,
)
from dicom_node.errors import ConfigError, PermanentDeliveryError, TransientDeliveryError
from dicom_node.settings import DestinationSettings
from tests.delivery_peers import (
    DicomwebProxy,
    foreign_copy,
    orthanc_copies,
    orthanc_file,
    result_objects,
    tls_server_context,
)
from tests.dicomgen import CANARY_ID, CANARY_NAME
from tests.peers import ORTHANC_PASSWORD, ORTHANC_USER, Orthanc


def stow_to(url: str, name: str = "pacs", **settings: object) -> StowDestination:
    dest = build_destination(name, DestinationSettings(url=url, **settings))  # type: ignore[arg-type]
    assert isinstance(dest, StowDestination)
    return dest


@pytest.fixture
def results(tmp_path: Path) -> list[Path]:
    return result_objects(tmp_path / "results")


@pytest.fixture
def proxy_factory(clean_orthanc: Orthanc) -> Iterator[object]:
    started: list[DicomwebProxy] = []

    def make(**kw: object) -> DicomwebProxy:
        proxy = DicomwebProxy(clean_orthanc, **kw).start()  # type: ignore[arg-type]
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


def test_stow_sends_the_stored_bytes_and_reads_them_back(
    clean_orthanc: Orthanc, results: list[Path]
) -> None:
    dest = stow_to(clean_orthanc.dicomweb_url_with_credentials)
    assert dest.username == ORTHANC_USER and ORTHANC_PASSWORD not in repr(dest)

    report = deliver(dest, results, verify=True)

    assert report.delivered and report.verified
    assert [o.verdict for o in report.outcomes] == [Verdict.STORED, Verdict.STORED]
    for path in results:
        assert orthanc_file(clean_orthanc, path) == path.read_bytes()  # byte for byte
    series = clean_orthanc.get("/series").json()
    assert len(series) == 2  # the SEG and SR series; the CT was never sent


def test_resending_the_same_files_leaves_one_copy(
    clean_orthanc: Orthanc, results: list[Path]
) -> None:
    dest = stow_to(clean_orthanc.dicomweb_url_with_credentials)
    for _ in range(3):
        assert deliver(dest, results, verify=True).delivered
    assert orthanc_copies(clean_orthanc, results) == {
        k: 1 for k in orthanc_copies(clean_orthanc, results)
    }
    assert len(clean_orthanc.get("/instances").json()) == len(results)


def test_wrong_password_is_a_permanent_error_without_secrets(
    clean_orthanc: Orthanc, results: list[Path]
) -> None:
    url = clean_orthanc.dicomweb_url_with_credentials.replace(ORTHANC_PASSWORD, "not-the-password")
    with pytest.raises(PermanentDeliveryError) as err:
        deliver(stow_to(url), results, verify=False)
    message = str(err.value)
    assert "HTTP 401" in message and "credentials" in message
    assert "not-the-password" not in message
    assert clean_orthanc.get("/instances").json() == []


def test_error_messages_carry_no_patient_data_or_uids(
    clean_orthanc: Orthanc, results: list[Path]
) -> None:
    proxy = DicomwebProxy(clean_orthanc).start()
    try:
        proxy.stow_faults.append(503)
        with pytest.raises(TransientDeliveryError) as err:
            deliver(stow_to(proxy.url), results, verify=False)
    finally:
        proxy.stop()
    from tests.delivery_peers import sop_uid_of

    message = str(err.value)
    assert "HTTP 503" in message
    assert CANARY_NAME.split("^")[0] not in message and CANARY_ID not in message
    assert all(sop_uid_of(p) not in message for p in results)


def test_bearer_token_reaches_the_server(
    proxy_factory, clean_orthanc: Orthanc, results: list[Path]
) -> None:  # type: ignore[no-untyped-def]
    proxy = proxy_factory(bearer_token="s3cret-token")
    dest = stow_to(proxy.url, token=SecretStr("s3cret-token"), read_back=True)

    report = deliver(dest, results)  # read_back from the settings: verify through the proxy too

    assert report.delivered and report.verified
    assert orthanc_copies(clean_orthanc, results) == {
        k: 1 for k in orthanc_copies(clean_orthanc, results)
    }
    posts = [s for s in proxy.seen if s["method"] == "POST"]
    assert posts and all(s["authorization"] == "Bearer s3cret-token" for s in proxy.seen)
    assert "s3cret-token" not in repr(dest)


def test_wrong_bearer_token_is_permanent_and_stores_nothing(
    proxy_factory, clean_orthanc: Orthanc, results: list[Path]
) -> None:  # type: ignore[no-untyped-def]
    proxy = proxy_factory(bearer_token="right")
    with pytest.raises(PermanentDeliveryError, match="HTTP 401"):
        deliver(stow_to(proxy.url, token=SecretStr("wrong")), results, verify=False)
    assert clean_orthanc.get("/instances").json() == []


def test_token_and_password_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="either a bearer token or user:password"):
        stow_to("https://u:p@pacs.example/dicom-web", token=SecretStr("t"))


def test_tls_is_verified_against_the_configured_ca(
    tmp_path: Path, proxy_factory, clean_orthanc: Orthanc, results: list[Path]
) -> None:  # type: ignore[no-untyped-def]
    ctx, ca = tls_server_context(tmp_path)
    proxy = proxy_factory(tls=ctx)
    assert proxy.url.startswith("https://")

    # The private CA is not in the system trust store: refused, permanently, nothing sent.
    with pytest.raises(PermanentDeliveryError, match="certificate is not trusted"):
        deliver(stow_to(proxy.url), results, verify=False)
    assert clean_orthanc.get("/instances").json() == []
    with pytest.raises(PermanentDeliveryError, match="certificate is not trusted"):
        echo_destination(stow_to(proxy.url))

    # Trusting exactly that CA: delivered over HTTPS.
    dest = stow_to(proxy.url, verify_tls=ca)
    assert echo_destination(dest) >= 0
    assert deliver(dest, results, verify=True).verified
    assert len(clean_orthanc.get("/instances").json()) == len(results)


def test_tls_verification_cannot_be_turned_off(tmp_path: Path) -> None:
    with pytest.raises(DestinationConfigError, match="verify_tls = false is not supported"):
        stow_to("https://pacs.example/dicom-web", verify_tls=False)
    with pytest.raises(ConfigError, match="does not exist"):
        stow_to("https://pacs.example/dicom-web", verify_tls=tmp_path / "missing-ca.pem")


def test_conflict_for_our_own_object_counts_as_delivered(
    proxy_factory, clean_orthanc: Orthanc, results: list[Path]
) -> None:  # type: ignore[no-untyped-def]
    proxy = proxy_factory()
    dest = stow_to(proxy.url)
    assert deliver(dest, results).delivered  # stored once through the proxy

    proxy.stow_faults.append("conflict")  # now the server answers "already stored" (409, 45070)
    report = deliver(dest, results, verify=True)

    assert [o.verdict for o in report.outcomes] == [Verdict.DUPLICATE, Verdict.DUPLICATE]
    assert all("already there is ours" in o.detail for o in report.outcomes)
    assert len(clean_orthanc.get("/instances").json()) == len(results)


def test_conflict_for_someone_elses_object_is_permanent(
    tmp_path: Path, proxy_factory, clean_orthanc: Orthanc, results: list[Path]
) -> None:  # type: ignore[no-untyped-def]
    theirs = foreign_copy(
        results[1], tmp_path / "foreign" / "sr.dcm", Manufacturer="another-vendor"
    )
    clean_orthanc.upload([theirs])
    proxy = proxy_factory()
    proxy.stow_faults.append("conflict")

    with pytest.raises(PermanentDeliveryError) as err:
        deliver(stow_to(proxy.url), results, verify=False)

    assert "differs in Manufacturer" in str(err.value)
    assert "another-vendor" not in str(err.value)  # attribute names, never values
    report = err.value.report  # type: ignore[attr-defined]
    assert [o.verdict for o in report.outcomes] == [Verdict.PERMANENT, Verdict.PERMANENT]
    # The SEG was not on the server at all: a conflict answer for it cannot be trusted either.
    assert "no object with this SOP Instance UID is there" in report.outcomes[0].detail
    assert orthanc_file(clean_orthanc, results[1]) == theirs.read_bytes()  # never overwritten


def test_echo_destination_checks_credentials(clean_orthanc: Orthanc) -> None:
    assert echo_destination(stow_to(clean_orthanc.dicomweb_url_with_credentials)) < 30
    with pytest.raises(PermanentDeliveryError, match="401"):
        echo_destination(stow_to(clean_orthanc.dicomweb_url))  # no credentials at all


def test_destinations_from_settings(make_settings) -> None:  # type: ignore[no-untyped-def]
    from dicom_node.delivery import CStoreDestination, destinations_from_settings

    settings = make_settings(
        ae_title="MYNODE",
        destination="https://ai%40site:p%40ss%3Aword@pacs.example:8443/dicom-web/",
        destinations={
            "archive": {"url": "dicom://ARCHIVE@10.0.0.5:104", "read_back": True, "timeout": 7}
        },
    )
    built = destinations_from_settings(settings)

    stow, archive = built["default"], built["archive"]
    assert isinstance(stow, StowDestination) and isinstance(archive, CStoreDestination)
    assert (
        stow.base_url == "https://pacs.example:8443/dicom-web"
    )  # no credentials, no trailing slash
    assert stow.username == "ai@site" and stow.password is not None
    assert stow.password.get_secret_value() == "p@ss:word"
    assert "p@ss" not in repr(stow) and "p%40ss" not in stow.display
    assert (archive.ae_title, archive.host, archive.port) == ("ARCHIVE", "10.0.0.5", 104)
    assert (
        archive.calling_ae_title == "MYNODE"
        and archive.read_back
        and archive.peer().dimse_timeout == 7
    )
