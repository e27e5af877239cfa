"""The interactive API documentation (Swagger UI) at ``/api/docs``, served from the node.

Hospital networks often have no internet, and a page that pulls scripts from a CDN runs
whatever that CDN serves with the user's credentials. The Swagger UI files come from the
``fastapi-offline`` package (Swagger UI 5, which reads the OpenAPI 3.1 schema FastAPI
writes) and are served here behind the same credentials as the rest of the API.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import Response

from dicom_node.api.deps import User

router = APIRouter(include_in_schema=False)

DOCS_URL = "/api/docs"
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon.png": "image/png",
}
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.S)


def _asset_dir() -> Any:
    return files("fastapi_offline") / "static"


@router.get(DOCS_URL)
def swagger_ui(request: Request, user: User) -> Response:
    """Swagger UI for ``/api/openapi.json``, every file from this node."""
    page = get_swagger_ui_html(
        openapi_url=request.app.openapi_url,
        title=f"{request.app.title} API",
        swagger_js_url=f"{DOCS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{DOCS_URL}/favicon.png",
        # No spec validator badge: it would send the schema to validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None},
    )
    # The page's one inline script (the Swagger UI set-up) is allowed by its hash; nothing
    # else inline runs. Swagger UI sets inline styles, hence 'unsafe-inline' for styles only.
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'"
        for body in _INLINE_SCRIPT.findall(page.body)
    )
    page.headers["Content-Security-Policy"] = (
        f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    )
    return page


@router.get(DOCS_URL + "/{name}")
def swagger_asset(name: str, user: User) -> Response:
    """The Swagger UI script, style sheet and icon."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404, "not found")
    body = (_asset_dir() / name).read_bytes()
    return Response(body, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})
