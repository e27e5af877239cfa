"""Settings: loaded once from defaults, a TOML file and DICOM_NODE_* variables (which win);
errors name the setting, its environment variable and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.errors import ConfigError
from dicom_node.settings import DuplicatePolicy, load_settings


def test_defaults_match_the_interface_contract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert (s.ae_title, s.dicom_port, s.http_port, s.bind) == ("AINODE", 11112, 8080, "127.0.0.1")
    assert s.data_dir == Path("./var")
    assert s.resolved_database_url == f"sqlite:///{(tmp_path / 'var' / 'state.sqlite').resolve()}"
    assert s.scp.fsync is True
    assert s.scp.max_pdu_size == 131072
    assert s.scp.duplicate_policy is DuplicatePolicy.KEEP_FIRST
    assert s.scp.allowed_callers is None


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        'ae_title = "FROMFILE"\ndicom_port = 4000\n[scp]\nmax_associations = 5\n'
        '[[scp.allowed_callers]]\nae_title = "CT1"\nhosts = ["10.1.0.0/16"]\n'
    )
    monkeypatch.setenv("DICOM_NODE_DICOM_PORT", "4100")
    monkeypatch.setenv("DICOM_NODE_SCP__DUPLICATE_POLICY", "reject")
    s = load_settings(cfg)
    assert s.ae_title == "FROMFILE"
    assert s.dicom_port == 4100
    assert s.scp.max_associations == 5
    assert s.scp.duplicate_policy is DuplicatePolicy.REJECT
    (caller,) = s.scp.allowed_callers or []
    assert caller.allows_host("10.1.2.3") and not caller.allows_host("10.2.0.1")
    assert not caller.allows_host("not-an-ip")
    monkeypatch.setenv("DICOM_NODE_CONFIG", str(cfg))
    assert load_settings().ae_title == "FROMFILE"


@pytest.mark.parametrize(
    ("env", "value", "location"),
    [
        ("DICOM_NODE_DICOM_PORT", "70000", "dicom_port"),
        ("DICOM_NODE_AE_TITLE", "A\\B", "ae_title"),
        ("DICOM_NODE_AE_TITLE", "", "ae_title"),
        ("DICOM_NODE_BIND", "localhost", "bind"),
        ("DICOM_NODE_SCP__MAX_PDU_SIZE", "-1", "scp.max_pdu_size"),
        ("DICOM_NODE_SCP__DUPLICATE_POLICY", "sometimes", "scp.duplicate_policy"),
        ("DICOM_NODE_SCP__RECEIVERS", "0", "scp.receivers"),
        ("DICOM_NODE_DESTINATION", "ftp://pacs", "destination"),
    ],
)
def test_bad_environment_values_name_the_setting_and_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, location: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert location in message and env in message


def test_secrets_are_not_echoed_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_NODE_DESTINATION", "https://user:s3cret@/dicom-web")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "s3cret" not in str(info.value)


def test_unknown_setting_in_the_file_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text("[scp]\nmax_asociations = 3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert "scp.max_asociations" in str(info.value)
    assert str(cfg) in str(info.value)


def test_tls_needs_its_files(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text("[scp.tls]\nenabled = true\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert "tls.certificate is required" in str(info.value)


def test_allowed_caller_hosts_are_validated(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('[[scp.allowed_callers]]\nae_title = "CT1"\nhosts = ["pacs.example"]\n')
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert "not an IP address or CIDR network" in str(info.value)
