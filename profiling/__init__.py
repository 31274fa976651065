"""Profiling helpers (NVTX ranges, nsys/ncu runners and report parsers); filled by a later issue."""
