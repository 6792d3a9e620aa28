"""Command line, config composition and validation, launchers and the per-rank trainer."""
