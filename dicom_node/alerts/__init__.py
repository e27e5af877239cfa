"""Alerts: health gauges, the alert monitor, and signed outgoing webhooks.

* :mod:`dicom_node.alerts.health`: destination health, waiting-job ages per priority and free
  disk space, read from the state database and the file systems (``/metrics`` uses them);
* :mod:`dicom_node.alerts.monitor`: :class:`AlertMonitor`, the ``dicom-node serve`` component
  that turns changes into events;
* :mod:`dicom_node.alerts.webhooks`: :class:`WebhookSender` (bounded queue, retries, HMAC
  signatures) and :func:`verify`, the receiver's check.

Configured in ``[alerts]`` (:class:`dicom_node.settings.AlertSettings`). The package itself
imports nothing, so ``/metrics`` can use :mod:`~dicom_node.alerts.health` without loading the
sender.
"""
