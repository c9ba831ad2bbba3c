"""Deployment: static graphs (export), quantization and profiling."""
