"""Speed benchmarks: `python -m benchmarks.run --help`, `bash benchmarks/gpu_check.sh`, `benchmarks/cpu_vs_original.py`."""
