"""Shared fast building blocks. No method knowledge lives here: methods compose these."""
