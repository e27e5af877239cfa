"""The HTTP side of the node: JSON API, dashboard, metrics, health, DICOMweb."""
