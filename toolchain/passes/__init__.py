"""Graph and weight rewrites the quantization stages apply to earn parity: cross-layer equalization,
SmoothQuant, rescaling, bias correction, float attention masks, observers, lifting recurrent
layers, decompositions of ops a backend lacks, BatchNorm1d as a depthwise convolution."""
