"""The DIMSE status table (PS3.7 Annex C, PS3.4 B.2.3): every constant's class, write-back verdict
and name, and what an unknown code or a local marker becomes."""

from __future__ import annotations

import doctest

import pytest

from dicom_node import dimse_status
from dicom_node.dimse_status import Category, Verdict, category, classify_status, describe

# Every constant the module defines, with its class (PS3.7 C.1-C.4, PS3.4 B.2.3) and what it
# means for write-back. Written out by hand from the standard: the module must agree.
EXPECTED = {
    "STATUS_SUCCESS": (0x0000, Category.SUCCESS, Verdict.STORED),
    "STATUS_WARNING": (0x0001, Category.WARNING, Verdict.WARNING),
    "STATUS_ATTRIBUTE_LIST_ERROR": (0x0107, Category.WARNING, Verdict.WARNING),
    "STATUS_ATTRIBUTE_VALUE_OUT_OF_RANGE": (0x0116, Category.WARNING, Verdict.WARNING),
    "STATUS_COERCION": (0xB000, Category.WARNING, Verdict.WARNING),
    "STATUS_ELEMENTS_DISCARDED": (0xB006, Category.WARNING, Verdict.WARNING),
    "STATUS_DATASET_MISMATCH_STORED": (0xB007, Category.WARNING, Verdict.WARNING),
    "STATUS_ALREADY_STORED": (0xB00E, Category.WARNING, Verdict.DUPLICATE),
    "STATUS_PROCESSING_FAILURE": (0x0110, Category.FAILURE, Verdict.PERMANENT),
    "STATUS_DUPLICATE_SOP_INSTANCE": (0x0111, Category.FAILURE, Verdict.DUPLICATE),
    "STATUS_SOP_CLASS_NOT_SUPPORTED": (0x0122, Category.FAILURE, Verdict.PERMANENT),
    "STATUS_NOT_AUTHORIZED": (0x0124, Category.FAILURE, Verdict.PERMANENT),
    "STATUS_RESOURCE_LIMITATION": (0x0213, Category.FAILURE, Verdict.TRANSIENT),
    "STATUS_OUT_OF_RESOURCES": (0xA700, Category.FAILURE, Verdict.TRANSIENT),
    "STATUS_DATASET_MISMATCH": (0xA900, Category.FAILURE, Verdict.PERMANENT),
    "STATUS_CANNOT_UNDERSTAND": (0xC000, Category.FAILURE, Verdict.PERMANENT),
    "STATUS_MISSING_UID": (0xC001, Category.FAILURE, Verdict.PERMANENT),
    "STATUS_INVALID_UID": (0xC002, Category.FAILURE, Verdict.PERMANENT),
    "STATUS_CANNOT_DECODE": (0xC210, Category.FAILURE, Verdict.PERMANENT),
    "STATUS_HANDLER_ERROR": (0xC211, Category.FAILURE, Verdict.PERMANENT),
    "STATUS_CANCEL": (0xFE00, Category.CANCEL, Verdict.PERMANENT),
    "STATUS_PENDING": (0xFF00, Category.PENDING, Verdict.PERMANENT),
    "STATUS_PENDING_WARNING": (0xFF01, Category.PENDING, Verdict.PERMANENT),
    "STATUS_NO_RESPONSE": (-1, Category.FAILURE, Verdict.PERMANENT),
    "STATUS_NOT_SENT": (-2, Category.FAILURE, Verdict.PERMANENT),
}


def test_the_table_names_every_constant_of_the_module() -> None:
    defined = {name for name in vars(dimse_status) if name.startswith("STATUS_")}
    assert defined == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_constant_has_its_standard_value_class_and_verdict(name: str) -> None:
    code, kind, verdict = EXPECTED[name]
    assert getattr(dimse_status, name) == code
    assert category(code) is kind
    assert classify_status(code) is verdict


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_constant_has_its_own_name(name: str) -> None:
    text = describe(EXPECTED[name][0])
    assert not text.endswith(" Status"), text  # the generic fallback is for unknown codes
    if EXPECTED[name][0] >= 0:
        assert text.startswith(f"0x{EXPECTED[name][0]:04X}")


@pytest.mark.parametrize(
    ("code", "kind", "verdict", "text"),
    [
        # unknown codes take the class of their range (PS3.4 B.2.3)
        (0xB123, Category.WARNING, Verdict.WARNING, "0xB123 Status"),
        (0xA7FF, Category.FAILURE, Verdict.TRANSIENT, "0xA7FF Out of resources"),
        (0xA9FF, Category.FAILURE, Verdict.PERMANENT, "0xA9FF Data set does not match SOP class"),
        (0xC123, Category.FAILURE, Verdict.PERMANENT, "0xC123 Cannot understand"),
        (0xCFFF, Category.FAILURE, Verdict.PERMANENT, "0xCFFF Cannot understand"),
        # and outside any range, a failure
        (0x0105, Category.FAILURE, Verdict.PERMANENT, "0x0105 Status"),
        (0xD000, Category.FAILURE, Verdict.PERMANENT, "0xD000 Status"),
        (0xFE01, Category.FAILURE, Verdict.PERMANENT, "0xFE01 Status"),
    ],
)
def test_unknown_codes_are_classified_by_their_range(
    code: int, kind: Category, verdict: Verdict, text: str
) -> None:
    assert category(code) is kind
    assert classify_status(code) is verdict
    assert describe(code) == text


def test_markers_are_described_without_a_code() -> None:
    assert describe(dimse_status.STATUS_NO_RESPONSE) == "no response (timeout or abort)"
    assert describe(dimse_status.STATUS_NOT_SENT) == "not sent"
    assert describe(dimse_status.STATUS_ALREADY_STORED) == "0xB00E (45070) Already stored"


def test_cannot_understand_is_the_cxxx_range_only() -> None:
    assert all(dimse_status.is_cannot_understand(c) for c in (0xC000, 0xC001, 0xC211, 0xCFFF))
    assert not any(
        dimse_status.is_cannot_understand(c) for c in (0x0000, 0xA700, 0xB000, 0xD000, -1, -2)
    )


def test_the_module_examples_hold() -> None:
    result = doctest.testmod(dimse_status)
    assert result.attempted >= 4 and result.failed == 0
