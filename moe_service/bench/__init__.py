"""Benchmarks the project ships: each compares paths side by side in one run."""
