"""Axis names of (Z, Y, X) volumes, shared by training crops and inference.

``xy`` = planes along Z (slices), ``xz`` = planes along Y, ``yz`` = planes along X.
"""

AXES = ("xy", "xz", "yz")
SLICE_AXIS = {"xy": 0, "xz": 1, "yz": 2}  # the array axis each view slices along

__all__ = ["AXES", "SLICE_AXIS"]
