"""Procedural anatomical phantoms."""
