"""Eager PyTorch references of every method (the ground truth the exported graphs are held to)."""

from __future__ import annotations

from tokensieve.methods.faces import Faces

FACES = Faces(__name__)  # the methods' eager faces ("reference", "site_reference", "cache_score_reference"), by class
