"""A minimal durable pynetdicom storage SCP: the framework's floor for the ingest benchmark.

The floor ``bench_ingest.py`` compares the node with: the encoded dataset written as received to
``<n>.dcm`` and fsynced before answering success, 128 KiB PDUs, pynetdicom's handler logging off.
No validation, no index, no duplicate handling: what any pynetdicom receiver costs at least.

    python benchmarks/minimal_scp.py PORT OUT_DIR
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification


def main() -> int:
    port, out = int(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    _config.LOG_HANDLER_LEVEL = "none"
    counter = itertools.count()

    def handle_store(event: evt.Event) -> int:
        path = out / f"{next(counter)}.dcm"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, event.encoded_dataset())
            os.fsync(fd)
        finally:
            os.close(fd)
        return 0x0000

    ae = AE(ae_title="MINSCP")
    ae.maximum_pdu_size = 131072
    ae.maximum_associations = 16
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax)
    ae.add_supported_context(Verification)
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)]
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
