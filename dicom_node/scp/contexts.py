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
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

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


def storage_contexts(*, deflated: bool) -> list[PresentationContext]:
    """Every storage SOP class pynetdicom knows (SEG, SR, enhanced multi-frame included)."""
    syntaxes = accepted_transfer_syntaxes(deflated=deflated)
    contexts = []
    for cx in AllStoragePresentationContexts:
        new = PresentationContext()
        new.abstract_syntax = cx.abstract_syntax
        new.transfer_syntax = syntaxes
        contexts.append(new)
    return contexts


def verification_context() -> PresentationContext:
    cx = PresentationContext()
    cx.abstract_syntax = Verification
    cx.transfer_syntax = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
    return cx
