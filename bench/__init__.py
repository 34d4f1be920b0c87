"""Benchmarks for Vespa against the emulator: `bench/run.sh [--quick]` (issue 8)."""
