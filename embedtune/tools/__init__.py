"""Maintainers' instruments, apart from the library: benchmarks and the kill soak."""
