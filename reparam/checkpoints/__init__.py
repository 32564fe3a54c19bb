"""Checkpoint files (formats) and key layouts, and RepVGG networks read from and written to them."""

from .formats import CHECKPOINT_SUFFIXES, read_tensors, save_array, write_tensors
from .layouts import LAYOUTS, detect_layout
from .repvgg import from_state_dict, load, save, to_state_dict

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "LAYOUTS",
    "detect_layout",
    "from_state_dict",
    "load",
    "read_tensors",
    "save",
    "save_array",
    "to_state_dict",
    "write_tensors",
]
