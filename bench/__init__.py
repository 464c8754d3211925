"""vitkit's benchmarks: one harness (bench/harness.py), one module per measured area; see bench/README.md.

Importing this package imports nothing heavy: suite modules load only when their suite runs.
"""
