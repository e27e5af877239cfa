"""DICOMweb on the node (PS3.18): STOW-RS ingest, WADO-RS and a minimal QIDO-RS.

STOW-RS feeds the same validate-and-store path as C-STORE (:class:`dicom_node.ingest.Ingestor`),
so an instance is stored, indexed and completed the same way whichever way it came. WADO-RS
serves spooled instances byte for byte, so that workers on other machines read their inputs
without a shared disk. The HTTP routes are in :mod:`dicom_node.api.routes.dicomweb`.
"""
