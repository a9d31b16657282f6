"""Speed benchmarks (issue 8): `python -m benchmarks.run --help`."""
