"""Helpers shared by every stage: one place for each thing (schema, params, I/O, text, run log)."""
