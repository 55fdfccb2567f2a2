"""Image captioners behind one interface; `load_captioner` picks one by kind."""

from fluxlora.captioning.captioners.base import (
    Captioner,
    known_captioners,
    load_captioner,
    register_captioner,
)

__all__ = ["Captioner", "known_captioners", "load_captioner", "register_captioner"]
