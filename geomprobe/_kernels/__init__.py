"""numba kernels: plain arrays in, plain arrays out; no validation, no I/O, no raise."""
