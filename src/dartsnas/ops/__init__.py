"""Candidate operations of the DARTS search spaces."""
