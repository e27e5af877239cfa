"""Ingest: validate and store every received instance (C-STORE and STOW-RS) the same way.

* :mod:`~dicom_node.ingest.parser` reads and bounds a received Part 10 file (:class:`Parsed`);
* :mod:`~dicom_node.ingest.received` is the record of one received instance (:class:`Received`);
* :mod:`~dicom_node.ingest.index` adds it to the state database (:class:`IndexWriter`);
* :mod:`~dicom_node.ingest.ingestor` runs the steps, spool placement included
  (:class:`Ingestor`, :class:`IngestResult`).

DIMSE statuses are in :mod:`dicom_node.dimse_status`.
"""

from dicom_node.ingest.index import Indexed, IndexWriter
from dicom_node.ingest.ingestor import Ingestor, IngestResult
from dicom_node.ingest.parser import (
    MAX_SEQUENCE_DEPTH,
    Parsed,
    dataset_sha256,
    parse_part10,
    parse_part10_bytes,
)
from dicom_node.ingest.received import Received

__all__ = [
    "MAX_SEQUENCE_DEPTH",
    "IndexWriter",
    "Indexed",
    "IngestResult",
    "Ingestor",
    "Parsed",
    "Received",
    "dataset_sha256",
    "parse_part10",
    "parse_part10_bytes",
]
