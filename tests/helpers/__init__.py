"""Importable helpers for tests that launch `python -m metarec` subprocesses (PYTHONPATH=tests)."""
