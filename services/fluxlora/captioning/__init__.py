"""Captioning: auto-captioners, caption cleaning and kohya-style caption sidecars."""
