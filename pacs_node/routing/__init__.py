"""Routing: which stable studies go to which models, and where their results are sent."""
