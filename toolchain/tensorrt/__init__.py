"""TensorRT backend: what a build can prepare anywhere (plan.py) and what needs TensorRT and a
GPU (engine.py, imported only when an engine is built or checked)."""
