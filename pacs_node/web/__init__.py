"""The doors over HTTP: DICOMweb, the JSON API, the pages and the viewer, health and metrics."""
