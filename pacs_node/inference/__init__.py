"""Segmentation: the label vocabulary, model bundles, the runner and classical CT localisation."""
