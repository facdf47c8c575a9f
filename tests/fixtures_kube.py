"""Fixtures: kube (filled in by its issue)."""
