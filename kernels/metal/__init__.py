"""Metal kernels for the MLX backend (mx.fast.metal_kernel), each mirrored step by step by an MLX-ops
function that runs everywhere else and that the tests hold against kernels/reference.py."""
