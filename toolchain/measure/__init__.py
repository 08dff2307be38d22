"""Measurements: latency and memory timing, per-operator profiles, and the CPU's instruction set."""
