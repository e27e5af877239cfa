"""``dicom-node serve``."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        ctx: typer.Context,
        receivers: Annotated[
            int | None, typer.Option(help="Receiver processes sharing the DICOM port.", min=1)
        ] = None,
    ) -> None:
        """Run the node: the C-STORE listener, the job pipeline and the HTTP API.

        With no configuration it listens as AINODE on 127.0.0.1:11112, keeps everything under
        ./var and needs no external server. Stop it with SIGTERM or Ctrl-C: running transfers
        get a grace period, and no partial file is ever left under a final name.
        """
        from dicom_node.cli import state
        from dicom_node.logs import setup_logging
        from dicom_node.service import NodeService

        st = state(ctx)
        if receivers is not None:
            st.overrides.setdefault("scp", {})["receivers"] = receivers
        settings = st.settings()
        setup_logging(settings.log)
        from dicom_node.metrics import prepare_multiprocess

        # Before anything imports prometheus_client, and before receivers are spawned: they
        # inherit the directory where each process writes its metric values.
        prepare_multiprocess(settings.data_dir)
        from dicom_node import audit
        from dicom_node.components import build_components

        service = NodeService(settings)
        service.config_path = str(st.config) if st.config else None
        service.extra_components = build_components(settings, service)
        audit.record(None, audit.CONFIG_LOADED, actor="node", config=str(st.config or "-"))
        raise typer.Exit(service.run())
