"""The error of the geometry package."""


class GeometryError(ValueError):
    """An image's plane cannot be read; the message names the attribute, never its value."""
