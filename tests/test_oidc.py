"""OpenID Connect bearer tokens against a local issuer the test starts (a small HTTP server on
127.0.0.1 serving ``/.well-known/openid-configuration`` and a JWKS, with an RSA key made here),
through the real HTTP API: a valid token's role claim decides what it may do; an expired token,
another audience or issuer, a bad signature, an unknown key, ``alg: none`` or a shared-secret
algorithm are 401 and audited with the reason; a role too low is 403."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from dicom_node.api.oidc import OidcVerifier
from dicom_node.settings import OidcSettings
from tests.test_roles import Node, serve

AUDIENCE = "dicom-node"
KID = "key-1"


class Issuer:
    """An OpenID provider's discovery document and JWKS, served on 127.0.0.1."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.requests: list[str] = []
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer.requests.append(self.path)
                body: dict[str, Any]
                if self.path == "/realms/x/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": f"{issuer.base}/realms/x/certs"}
                elif self.path == "/realms/x/certs":
                    jwk = RSAAlgorithm.to_jwk(issuer.key.public_key(), as_dict=True)
                    body = {"keys": [{**jwk, "kid": KID, "use": "sig", "alg": "RS256"}]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.url = f"{self.base}/realms/x"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def token(self, key: Any = None, kid: str | None = KID, algorithm: str = "RS256", **claims: Any) -> str:
        now = int(time.time())
        payload = {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": "f3c1-uuid",
            "preferred_username": "dr.who",
            "iat": now,
            "nbf": now - 5,
            "exp": now + 300,
            **claims,
        }
        payload = {k: v for k, v in payload.items() if v is not None}
        signer = key if key is not None else self.key
        if algorithm.startswith("RS"):
            signer = signer.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        headers = {"kid": kid} if kid else {}
        return jwt.encode(payload, signer, algorithm=algorithm, headers=headers)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def issuer() -> Iterator[Issuer]:
    provider = Issuer()
    yield provider
    provider.close()


@pytest.fixture(scope="module")
def node(issuer: Issuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    http = {
        "oidc": {"issuer": issuer.url, "audience": AUDIENCE, "role_claim": "realm_access.roles"},
        "login_failures": 1000,
    }
    with serve(tmp_path_factory.mktemp("oidc"), http=http) as n:
        yield n


def roles(*names: str) -> dict[str, Any]:
    return {"realm_access": {"roles": list(names)}}


def test_a_valid_token_is_allowed_what_its_role_allows(issuer: Issuer, node: Node) -> None:
    viewer = issuer.token(**roles("offline_access", "viewer"))
    assert node.get("/api/jobs", viewer).status_code == 200
    refused = node.post("/api/jobs/no-such-job/retry", viewer)
    assert refused.status_code == 403
    operator = issuer.token(**roles("viewer", "operator"))
    assert node.post("/api/jobs/no-such-job/retry", operator).status_code == 404  # past the role
    assert node.get("/api/audit", operator).status_code == 403
    admin = issuer.token(preferred_username="it.admin", **roles("admin"))
    trail = node.get("/api/audit?limit=1000", admin)
    assert trail.status_code == 200
    denied = [e for e in trail.json()["events"] if e["event"] == "access-denied"]
    assert [e["actor"] for e in denied] == ["http:dr.who@127.0.0.1", "http:dr.who@127.0.0.1"]
    # Without a name claim the subject names the user; without a known role it may do nothing.
    nameless = issuer.token(preferred_username=None, **roles("viewer"))
    assert node.get("/api/jobs", nameless).status_code == 200
    assert node.get("/api/jobs", issuer.token(**roles("nurse"))).status_code == 403
    assert node.get("/api/jobs", issuer.token()).status_code == 403
    # The keys were fetched once (discovery, then the JWKS), not per request.
    assert issuer.requests.count("/realms/x/certs") == 1


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "token expired"),
        ("not yet valid", "token not yet valid"),
        ("wrong audience", "wrong audience"),
        ("wrong issuer", "wrong issuer"),
        ("bad signature", "bad signature"),
        ("unknown kid", "unknown signing key"),
        ("no exp", "a required claim is missing"),
        ("alg none", "algorithm not accepted"),
        ("HS256 with the public key", "algorithm not accepted"),
        ("garbage", "malformed token"),
    ],
)
def test_invalid_tokens_are_401_and_audited(issuer: Issuer, node: Node, case: str, reason: str) -> None:
    now = int(time.time())
    admin = roles("admin")
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = issuer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = {
        "expired": lambda: issuer.token(exp=now - 120, **admin),
        "not yet valid": lambda: issuer.token(nbf=now + 600, **admin),
        "wrong audience": lambda: issuer.token(aud="another-app", **admin),
        "wrong issuer": lambda: issuer.token(iss="http://127.0.0.1:1/realms/evil", **admin),
        "bad signature": lambda: issuer.token(key=other_key, **admin),
        "unknown kid": lambda: issuer.token(key=other_key, kid="key-9", **admin),
        "no exp": lambda: issuer.token(exp=None, **admin),
        "alg none": lambda: jwt.encode({"iss": issuer.url, "aud": AUDIENCE, "exp": now + 60, **admin}, "", algorithm="none", headers={"kid": KID}),
        "HS256 with the public key": lambda: _hs256(public_pem, issuer.url, now, admin),
        "garbage": lambda: "aaa.bbb.ccc",
    }[case]()
    r = node.get("/api/jobs", token)
    assert r.status_code == 401, (case, r.status_code, r.text)
    failed = node.events("auth-failed")[-1]
    assert failed.detail["reason"] == reason and failed.detail["scheme"] == "bearer"
    assert token not in repr(failed.detail) and failed.actor == "http:token@127.0.0.1"


def _hs256(secret: bytes, iss: str, now: int, claims: dict[str, Any]) -> str:
    # PyJWT refuses a PEM key as an HMAC secret; build the token by hand, as an attacker would.
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": KID}).encode())
    body = b64(json.dumps({"iss": iss, "aud": AUDIENCE, "exp": now + 60, **claims}).encode())
    sig = b64(hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest())
    return f"{header}.{body}.{sig}"


def test_made_up_key_ids_do_not_hammer_the_provider(issuer: Issuer, tmp_path: Path) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    before = issuer.requests.count("/realms/x/certs")
    http = {"oidc": {"issuer": issuer.url, "audience": AUDIENCE}, "login_failures": 1000}
    with serve(tmp_path, http=http) as fresh:
        assert fresh.get("/api/jobs", issuer.token(roles=["viewer"])).status_code == 200
        for n in range(20):
            assert fresh.get("/api/jobs", issuer.token(key=other, kid=f"made-up-{n}")).status_code == 401
    # one fetch at the first token; the unknown ids then wait MIN_REFRESH_SECONDS
    assert issuer.requests.count("/realms/x/certs") - before == 1


def test_role_claims_and_mapping() -> None:
    settings = OidcSettings(
        issuer="https://login.example.org/realms/radiology",
        audience="dicom-node",
        role_claim="groups",
        roles={"radiology-it": "operator", "radiologists": "viewer", "pacs-admins": "admin"},
    )
    verifier = OidcVerifier(settings)
    assert verifier.role_of({"groups": ["radiologists", "radiology-it"]}) == "operator"
    assert verifier.role_of({"groups": "pacs-admins"}) == "admin"
    assert verifier.role_of({"groups": ["viewer"]}) is None  # mapped: raw role names do not count
    assert verifier.role_of({}) is None


def test_oidc_settings_refuse_weak_choices() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="https"):
        OidcSettings(issuer="http://login.example.org/x", audience="a")
    with pytest.raises(ValidationError, match="refused"):
        OidcSettings(issuer="https://login.example.org/x", audience="a", algorithms=["HS256"])
