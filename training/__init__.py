"""Training scripts for the built-in models: run from a checkout, never shipped.

``pyproject.toml`` packages only ``dicom_node*`` and ``workers*``, so nothing here is in the
wheel or the Docker images, and nothing under ``workers/`` imports it: the worker loads the
weights these scripts wrote (``workers/models/weights/``), never the scripts.
"""
