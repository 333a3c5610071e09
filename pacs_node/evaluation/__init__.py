"""Checking a model against labelled cases: ground truth readers (DICOM + DICOM-SEG, NIfTI in
the Decathlon layout), overlap and surface metrics at the source resolution, and reports."""
