"""Checkpoint files (formats), network layouts, and networks read from and written to them."""

from .formats import CHECKPOINT_SUFFIXES, read_tensors, save_array, write_tensors
from .layouts import (
    LAYOUTS,
    NETWORK_LAYOUTS,
    NetworkLayout,
    detect_layout,
    register_network_layout,
)
from .repvgg import from_state_dict, load, save, to_state_dict

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "LAYOUTS",
    "NETWORK_LAYOUTS",
    "NetworkLayout",
    "detect_layout",
    "from_state_dict",
    "load",
    "read_tensors",
    "register_network_layout",
    "save",
    "save_array",
    "to_state_dict",
    "write_tensors",
]
