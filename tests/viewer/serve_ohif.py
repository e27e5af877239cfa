"""Serve OHIF's static build on loopback and proxy its DICOMweb calls to Orthanc.

* OHIF's build expects to sit at an origin root and needs an SPA fallback (unknown paths get
  ``index.html``); Orthanc's ServeFolders has no fallback, hence this server.
* ``/dicom-web`` and ``/wado`` are forwarded to Orthanc with Basic auth added. The ``Host``
  header passes through, so the BulkDataURIs Orthanc writes point back at this origin: no CORS
  (Orthanc 1.10 has none) and no auth prompt in the browser.
* ``/app-config.js`` is generated (data source = this origin, no investigational-use dialog),
  so the cached build is never modified.

Standalone: ``python -m tests.viewer.serve_ohif DIST PORT http://127.0.0.1:8042 user:password``.
"""

from __future__ import annotations

import base64
import http.client
import json
import sys
import threading
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization"}


def app_config(origin: str) -> str:
    """OHIF's ``window.config`` pointing at this server's DICOMweb proxy."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Test Orthanc",
            "name": "orthanc",
            "wadoUriRoot": f"{origin}/wado",
            "qidoRoot": f"{origin}/dicom-web",
            "wadoRoot": f"{origin}/dicom-web",
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video,pdf",
            "bulkDataURI": {"enabled": True},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "orthanc",
        "dataSources": [source],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


def _handler(dist: Path, upstream: urllib.parse.SplitResult, auth: str) -> type[SimpleHTTPRequestHandler]:
    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=str(dist), **kwargs)

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _proxy(self) -> None:
            length = int(self.headers.get("Content-Length", 0) or 0)
            body = self.rfile.read(length) if length else None
            headers = {
                k: v for k, v in self.headers.items()
                if k.lower() not in _HOP_BY_HOP | {"authorization", "accept-encoding", "content-length"}
            }
            headers["Authorization"] = auth
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=120)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP_BY_HOP | {"content-length", "www-authenticate"}:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            if path.startswith(("/dicom-web", "/wado")):
                return self._proxy()
            if path == "/app-config.js":
                host = self.headers.get("Host") or f"127.0.0.1:{self.server.server_address[1]}"
                data = app_config(f"http://{host}").encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/javascript")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return None
            if not (dist / path.lstrip("/")).is_file():
                self.path = "/index.html"  # SPA fallback
            return super().do_GET()

        def do_POST(self) -> None:
            self._proxy()

    return Handler


class OhifServer:
    """The static+proxy server in a background thread, bound to 127.0.0.1."""

    def __init__(self, dist: Path, upstream: str, user: str, password: str, port: int = 0) -> None:
        auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        handler = _handler(Path(dist), urllib.parse.urlsplit(upstream), auth)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="ohif-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> OhifServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def main(argv: list[str]) -> None:
    dist, port = Path(argv[1]), int(argv[2]) if len(argv) > 2 else 3000
    upstream = argv[3] if len(argv) > 3 else "http://127.0.0.1:8042"
    user, _, password = (argv[4] if len(argv) > 4 else "orthanc:orthanc").partition(":")
    server = OhifServer(dist, upstream, user, password, port)
    print(f"OHIF on {server.url} -> {upstream}", flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main(sys.argv)
