"""Integrations with trainers (TRL, transformers)."""
