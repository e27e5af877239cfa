"""dicom-node: the edge of the AI node (receiving, state, routing, dispatch, delivery, HTTP).

This package never imports torch or the ``workers`` package.
"""

__version__ = "0.1.0"
