"""Rerunnable experiments whose summaries are committed under documentation/results/."""
