"""Submitting job specs to a Ray cluster (Ray Jobs API)."""
