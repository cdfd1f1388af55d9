"""Measurement functions: they return records (dicts or dataclasses) and never print."""
