"""Benchmarks: each script compares the project with a baseline measured in the same run.

    python -m bench.overhead --help
    python -m bench.run_all          # all of them, ~10 minutes; writes docs/benchmarks.md

Every script is bounded in time, prints a table and writes bench/results/<name>.json.
Figures are ratios against a baseline measured on the same server in the same run, so they
survive a noisy machine. See docs/benchmarks.md for the last results.
"""
