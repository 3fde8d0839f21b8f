"""Custom Metal kernels: sources, dispatch (metal | mlx | emulate) and the CPU emulator for tests."""
