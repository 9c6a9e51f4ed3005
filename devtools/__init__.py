"""Throwaway servers and data helpers shared by tests, benchmarks and the demo; not in the wheel."""
