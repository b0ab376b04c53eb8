"""Tiny random-weight stand-ins of every family, written offline as real checkpoint folders.

``OURVIDZ_MODEL_SOURCE=tiny`` loads them through the same ``from_pretrained``
code path as real weights; each module's ``build_tiny(dest)`` is seeded, so
every machine builds the same model, and nothing is downloaded.
"""
