"""Revision files of the state database, one per schema change (see the package docstring)."""
