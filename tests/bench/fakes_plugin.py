"""Imported by the benchmark worker in a test: registers a method that kills its process."""

from tests.bench.fakes import register_crashing

register_crashing()
