"""The presentation contexts the listener accepts, in one place."""

from __future__ import annotations

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
COMPRESSED = [
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
]


def accepted_transfer_syntaxes(*, deflated: bool) -> list[str]:
    """Transfer syntaxes we accept and store exactly as received (never transcoded)."""
    syntaxes = [*UNCOMPRESSED, *COMPRESSED]
    if deflated:
        syntaxes.insert(2, DeflatedExplicitVRLittleEndian)
    return [str(s) for s in syntaxes]


def storage_contexts(*, deflated: bool) -> list[tuple[str, list[str]]]:
    """(SOP class, transfer syntaxes) for every storage SOP class pynetdicom knows (SEG, SR,
    enhanced multi-frame included)."""
    syntaxes = accepted_transfer_syntaxes(deflated=deflated)
    return [(str(cx.abstract_syntax), syntaxes) for cx in AllStoragePresentationContexts]


def verification_context() -> tuple[str, list[str]]:
    return str(Verification), [
        str(ExplicitVRLittleEndian),
        str(ImplicitVRLittleEndian),
        str(ExplicitVRBigEndian),
    ]
