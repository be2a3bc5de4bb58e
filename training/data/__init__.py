"""Datasets (ACDC h5, NIfTI folder, synthetic phantom), augmentation and two-stream sampling."""
