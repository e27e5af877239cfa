"""OpenID Connect bearer tokens (``[http.oidc]``): a JWT from the site's identity provider.

A token is accepted when (RFC 7519, OpenID Connect Core 1.0 §3.1.3.7):

* its header names an accepted asymmetric algorithm (``http.oidc.algorithms``) and the key id
  (``kid``) of one of the provider's signing keys, and the signature verifies with that key;
* ``exp`` has not passed and ``nbf`` has (``http.oidc.leeway`` seconds of skew allowed),
  ``iss`` is ``http.oidc.issuer`` and ``aud`` contains ``http.oidc.audience``.

The keys come from ``http.oidc.jwks_url``, or from the ``jwks_uri`` of the issuer's
``/.well-known/openid-configuration`` (OpenID Connect Discovery 1.0 §4, whose ``issuer`` must be
the configured one). They are kept ``http.oidc.cache_seconds``; a token with an unknown key id
fetches them again at most every :data:`MIN_REFRESH_SECONDS` (a provider rotating its keys is
seen, a client sending made-up key ids cannot make the node hammer the provider). Each fetch is
bounded in time (``http.oidc.timeout``) and size (:data:`MAX_DOCUMENT_BYTES`); when the provider
cannot be reached the keys already fetched stay in use.

PyJWT (``pip install 'dicom-node[oidc]'``) does the signature and claim checks.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from dicom_node.api.auth import AuthenticationFailed, Principal
from dicom_node.errors import ConfigError
from dicom_node.settings import ROLES, OidcSettings

LOGGER = logging.getLogger(__name__)

MIN_REFRESH_SECONDS = 30.0
"""Least time between two fetches of the keys caused by unknown key ids."""

MAX_DOCUMENT_BYTES = 1024 * 1024
"""Largest discovery document or key set read from the provider."""

ROLE_PREFERENCE = ("admin", "operator", "viewer", "worker", "sender")
"""With several roles in a token, the first of these it has counts."""


class ProviderUnavailable(Exception):
    """The provider's configuration or keys could not be fetched (the reason is safe to log)."""


class OidcVerifier:
    """Verifies bearer JWTs of one provider and turns them into a :class:`Principal`."""

    def __init__(self, settings: OidcSettings) -> None:
        try:
            import jwt  # noqa: F401  (fail at start-up, not at the first login)
        except ModuleNotFoundError:
            raise ConfigError(
                "http.oidc needs PyJWT with its crypto extra: pip install 'dicom-node[oidc]'"
            ) from None
        self.settings = settings
        self._jwks_url = settings.jwks_url
        self._keys: dict[str, Any] = {}
        self._fetched_at = -math.inf
        self._tried_at = -math.inf
        self._lock = threading.Lock()
        self._ssl = (
            ssl.create_default_context(cafile=str(settings.ca_certificates))
            if settings.ca_certificates
            else ssl.create_default_context()
        )

    def principal(self, token: str) -> Principal:
        """The principal a valid token stands for; :class:`AuthenticationFailed` otherwise."""
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationFailed("malformed token") from None
        algorithm = header.get("alg")
        if algorithm not in self.settings.algorithms:
            raise AuthenticationFailed("algorithm not accepted")
        key = self._key(header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[algorithm],
                audience=self.settings.audience,
                issuer=self.settings.issuer,
                leeway=self.settings.leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationFailed("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthenticationFailed("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationFailed("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise AuthenticationFailed("wrong issuer") from None
        except jwt.InvalidSignatureError:
            raise AuthenticationFailed("bad signature") from None
        except jwt.MissingRequiredClaimError:
            raise AuthenticationFailed("a required claim is missing") from None
        except jwt.PyJWTError:
            raise AuthenticationFailed("invalid token") from None
        name = claims.get(self.settings.name_claim) or claims.get("sub")
        if not isinstance(name, str) or not name.strip():
            raise AuthenticationFailed("the token names nobody")
        return Principal(name.strip()[:64], self.role_of(claims), "oidc")

    def role_of(self, claims: dict[str, Any]) -> Any:
        """The node role of a token's claims (None when it names none this node knows)."""
        value: Any = claims
        for part in self.settings.role_claim.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        mapping = self.settings.roles
        named = {(mapping.get(v) if mapping else v) for v in values if isinstance(v, str)} & set(
            ROLES
        )
        return next((role for role in ROLE_PREFERENCE if role in named), None)

    # -- keys --------------------------------------------------------------------------------

    def _key(self, kid: Any) -> Any:
        with self._lock:
            now = time.monotonic()
            stale = now - self._fetched_at > self.settings.cache_seconds
            missing = kid not in self._keys if kid is not None else len(self._keys) != 1
            if stale or (missing and now - self._tried_at >= MIN_REFRESH_SECONDS):
                self._tried_at = now
                try:
                    self._keys = self._fetch_keys()
                    self._fetched_at = now
                except ProviderUnavailable as exc:
                    LOGGER.warning("OIDC provider keys could not be fetched: %s", exc)
            if kid is None and len(self._keys) == 1:  # a provider with one key may omit kid
                return next(iter(self._keys.values()))
            key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise AuthenticationFailed("unknown signing key" if self._keys else "no signing keys")
        return key

    def _fetch_keys(self) -> dict[str, Any]:
        import jwt

        if self._jwks_url is None:
            self._jwks_url = self._discover()
        document = self._get_json(self._jwks_url)
        try:
            key_set = jwt.PyJWKSet.from_dict(document)
        except jwt.PyJWTError as exc:
            raise ProviderUnavailable(f"the key set is not usable ({type(exc).__name__})") from None
        return {k.key_id: k for k in key_set.keys if k.key_id and k.public_key_use in ("sig", None)}

    def _discover(self) -> str:
        issuer = self.settings.issuer.rstrip("/")
        document = self._get_json(f"{issuer}/.well-known/openid-configuration")
        if str(document.get("issuer", "")).rstrip("/") != issuer:
            raise ProviderUnavailable("the discovery document names another issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise ProviderUnavailable("the discovery document has no jwks_uri")
        return jwks_uri

    def _get_json(self, url: str) -> dict[str, Any]:
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        context = self._ssl if url.startswith("https://") else None
        try:
            with urllib.request.urlopen(
                request, timeout=self.settings.timeout, context=context
            ) as response:
                body = response.read(MAX_DOCUMENT_BYTES + 1)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ProviderUnavailable(f"{url}: {type(exc).__name__}") from None
        if len(body) > MAX_DOCUMENT_BYTES:
            raise ProviderUnavailable(f"{url}: larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            document = json.loads(body)
        except ValueError:
            raise ProviderUnavailable(f"{url}: not JSON") from None
        if not isinstance(document, dict):
            raise ProviderUnavailable(f"{url}: not a JSON object")
        return document


_CREATE_LOCK = threading.Lock()


def verifier_of(app: Any, settings: OidcSettings) -> OidcVerifier:
    """The app's verifier (one per app: its cached keys are shared by every request)."""
    with _CREATE_LOCK:
        verifier = getattr(app.state, "oidc_verifier", None)
        if verifier is None:
            verifier = OidcVerifier(settings)
            app.state.oidc_verifier = verifier
        return verifier
