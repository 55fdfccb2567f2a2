"""Checkpoint x strength evaluation: sampling, scoring and the labelled XY grid."""
