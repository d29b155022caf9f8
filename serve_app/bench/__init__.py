"""Benchmarks: `python -m serve_app.bench <command> --help`."""
