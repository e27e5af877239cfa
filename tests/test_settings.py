"""Settings: loaded once from defaults, a TOML file, DICOM_NODE_* variables and command options
(each winning over the one before, merged at every depth); list and map settings take the plain
forms an admin types; errors name the setting, its environment variable and the reason, never a
secret, and end the command with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.errors import ConfigError
from dicom_node.settings import DuplicatePolicy, deep_merge, load_settings
from tests.peers import NodeProcess


def test_defaults_match_the_interface_contract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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


# Plain forms an admin types, as well as JSON -----------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("tok1,tok2", ["tok1", "tok2"]),
        (" tok1 , tok2 ,", ["tok1", "tok2"]),
        ("abc123", ["abc123"]),
        ("123456", ["123456"]),  # JSON would read a number; it is one token
        ('["a,b", "c"]', ["a,b", "c"]),  # JSON: the way to give a token containing a comma
        ("", []),
    ],
)
def test_token_list_forms(monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]) -> None:
    monkeypatch.setenv("DICOM_NODE_HTTP__TOKENS", value)
    assert [t.get_secret_value() for t in load_settings().http.tokens] == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alice:pw1,bob:pw2", {"alice": "pw1", "bob": "pw2"}),
        ("alice:pw:with:colons", {"alice": "pw:with:colons"}),  # RFC 7617: no ':' in a user id
        ('{"alice": "pw,with,commas"}', {"alice": "pw,with,commas"}),
        ("", {}),
    ],
)
def test_user_map_forms(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: dict[str, str]
) -> None:
    monkeypatch.setenv("DICOM_NODE_HTTP__USERS", value)
    users = load_settings().http.users
    assert {name: pw.get_secret_value() for name, pw in users.items()} == expected


def test_every_scalar_list_takes_the_comma_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DICOM_NODE_WORKER__QUEUES", "cpu,gpu")
    # The same rule inside JSON and in the TOML file: a scalar list may be one comma string.
    monkeypatch.setenv(
        "DICOM_NODE_SCP__ALLOWED_CALLERS",
        '[{"ae_title": "CT01", "hosts": "10.1.0.0/16, 10.2.0.7"}]',
    )
    cfg = tmp_path / "node.toml"
    cfg.write_text('[[routes]]\nname = "ct"\nmodality = "CT,PT"\n')
    s = load_settings(cfg)
    assert s.worker.queues == ["cpu", "gpu"]
    (caller,) = s.scp.allowed_callers or []
    assert caller.hosts == ["10.1.0.0/16", "10.2.0.7"] and caller.allows_host("10.2.0.7")
    assert s.routes[0].modality == ["CT", "PT"]


@pytest.mark.parametrize(("value", "expected"), [("null", None), ("[]", [])])
def test_allowed_callers_none_and_nobody_stay_distinct(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: list[object] | None
) -> None:
    monkeypatch.setenv("DICOM_NODE_SCP__ALLOWED_CALLERS", value)
    assert load_settings().scp.allowed_callers == expected


@pytest.mark.parametrize(
    ("env", "value", "reason"),
    [
        ("DICOM_NODE_HTTP__USERS", "s3cret-pw", "not a name:value pair"),
        ("DICOM_NODE_HTTP__USERS", "alice:s3cret-1,alice:s3cret-2", "repeats a name"),
        ("DICOM_NODE_HTTP__TOKENS", '["s3cret-tok"', "not valid JSON"),
        ("DICOM_NODE_HTTP__TOKENS", '{"s3cret-tok": 1}', "valid list"),
        ("DICOM_NODE_SCP__ALLOWED_CALLERS", "CT01", "needs JSON in an environment variable"),
        ("DICOM_NODE_SCP__ALLOWED_CALLERS", "", "needs JSON in an environment variable"),
        ("DICOM_NODE_DESTINATIONS", '{"pacs": {"url": "https://u:s3cret@pacs/x"', "not valid JSON"),
    ],
)
def test_unreadable_list_and_map_values_are_explained_without_the_value(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, reason: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert env in message and reason in message
    assert "s3cret" not in message


# Layers: command line > environment > file > defaults, merged at every depth ------------------


def test_deep_merge_keeps_what_a_higher_layer_does_not_set() -> None:
    file = {"ae_title": "A", "scp": {"receivers": 2, "tls": {"enabled": True, "certificate": "c"}}}
    env = {"scp": {"tls": {"certificate": "d"}, "max_associations": "20"}}
    cli = {"scp": {"receivers": 3}}
    assert deep_merge(file, env, cli) == {
        "ae_title": "A",
        "scp": {
            "receivers": 3,
            "max_associations": "20",
            "tls": {"enabled": True, "certificate": "d"},
        },
    }
    assert deep_merge({"hosts": ["a", "b"]}, {"hosts": ["c"]}) == {"hosts": ["c"]}  # lists replace
    assert file["scp"] == {"receivers": 2, "tls": {"enabled": True, "certificate": "c"}}


@pytest.fixture
def scp_file(tmp_path: Path) -> Path:
    """A file whose [scp] section is all security: allow-list, TLS, duplicates, free space."""
    for name in ("node.pem", "node.key", "ca.pem"):
        (tmp_path / name).write_text("placeholder: only the file's existence is validated\n")
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        '[scp]\nreceivers = 2\nduplicate_policy = "reject"\nmin_free_bytes = 5_000_000_000\n'
        'allowed_callers = [{ ae_title = "CT01", hosts = ["10.1.5.0/24"] }]\n'
        f'[scp.tls]\nenabled = true\ncertificate = "{tmp_path / "node.pem"}"\n'
        f'private_key = "{tmp_path / "node.key"}"\nca_certificates = "{tmp_path / "ca.pem"}"\n'
    )
    return cfg


def test_a_command_line_option_keeps_the_rest_of_the_files_section(
    scp_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DICOM_NODE_SCP__MAX_ASSOCIATIONS", "20")
    monkeypatch.setenv("DICOM_NODE_SCP__RECEIVERS", "5")
    # What `dicom-node --config FILE serve --receivers 3` passes (dicom_node/cli/serve.py).
    scp = load_settings(scp_file, scp={"receivers": 3}).scp
    assert scp.receivers == 3  # the command line beats the environment, which beats the file
    assert scp.max_associations == 20
    assert [(c.ae_title, c.hosts) for c in scp.allowed_callers or []] == [("CT01", ["10.1.5.0/24"])]
    assert scp.tls.enabled and scp.tls.certificate == scp_file.parent / "node.pem"
    assert scp.duplicate_policy is DuplicatePolicy.REJECT
    assert scp.min_free_bytes == 5_000_000_000
    assert load_settings(scp_file).scp.receivers == 5


def test_environment_keeps_the_rest_of_the_files_section(
    scp_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DICOM_NODE_SCP__TLS__REQUIRE_PEER_CERTIFICATE", "false")
    scp = load_settings(scp_file).scp
    assert scp.tls.enabled and not scp.tls.require_peer_certificate
    assert scp.tls.ca_certificates == scp_file.parent / "ca.pem"
    assert scp.allowed_callers and scp.min_free_bytes == 5_000_000_000


def test_serve_receivers_option_keeps_the_files_allow_list(tmp_path: Path) -> None:
    """The user-visible failure: with --receivers, a CT01-only node accepted any caller."""
    cfg = tmp_path / "node.toml"
    cfg.write_text('[scp]\nallowed_callers = [{ ae_title = "CT01" }]\n')
    node = NodeProcess(
        tmp_path / "var",
        {"DICOM_NODE_HTTP_PORT": "0", "DICOM_NODE_WORKER__EMBEDDED_WORKERS": "0"},
        config=cfg,
    )
    node.start("--receivers", "1")
    try:
        calls = {
            aet: subprocess.run(
                ["echoscu", "-aet", aet, "-aec", "AINODE", "127.0.0.1", str(node.dicom_port)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            for aet in ("CT01", "INTRUDER")
        }
    finally:
        assert node.stop() == 0, node.log()
    assert calls["CT01"].returncode == 0, calls["CT01"].stderr
    assert calls["INTRUDER"].returncode != 0
    assert "Association Rejected" in calls["INTRUDER"].stdout + calls["INTRUDER"].stderr


# Every invalid value: one message, exit 2, through the real console command ------------------

CONSOLE = Path(sys.executable).parent / "dicom-node"


@pytest.mark.parametrize(
    ("env", "toml", "args", "names"),
    [
        ({"DICOM_NODE_HTTP__TOKENS": '["s3cret-tok",'}, None, ["jobs"], "http.tokens"),
        ({"DICOM_NODE_HTTP__USERS": "s3cret-pw"}, None, ["jobs"], "http.users"),
        ({"DICOM_NODE_DICOM_PORT": "99999"}, None, ["jobs"], "dicom_port"),
        (
            {"DICOM_NODE_SCP__ALLOWED_CALLERS": "{ae_title: CT01}"},
            None,
            ["jobs"],
            "scp.allowed_callers",
        ),
        ({}, '[http]\nusers = "alice=s3cret-pw"\n', ["jobs"], "http.users"),
        ({}, "[scp]\nreceivers = 2\n", ["serve", "--receivers", "65"], "scp.receivers"),
    ],
)
def test_invalid_values_end_in_the_message_and_exit_2(
    tmp_path: Path, env: dict[str, str], toml: str | None, args: list[str], names: str
) -> None:
    assert CONSOLE.is_file(), f"console script missing: {CONSOLE}"
    config: list[str] = []
    if toml is not None:
        (tmp_path / "node.toml").write_text(toml)
        config = ["--config", str(tmp_path / "node.toml")]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    result = subprocess.run(
        [str(CONSOLE), *config, *args],
        env={**clean, "DICOM_NODE_DATA_DIR": str(tmp_path / "var"), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "s3cret" not in result.stderr + result.stdout
    headline, detail = result.stderr.strip().splitlines()
    assert headline.startswith("error: invalid configuration")
    env_name = "DICOM_NODE_" + names.replace(".", "__").upper()
    assert detail.startswith(f"  - {names} [{env_name}]: ")
    assert not (tmp_path / "var").exists()  # refused before touching anything
