"""Profiling (`harmonica.profiling`): NVTX ranges of a cached generation (`nvtx`), the profiled workload
(`workload`), Nsight Systems and Nsight Compute sessions (`nsys`, `ncu`, `session`: `harmonica profile`)."""
