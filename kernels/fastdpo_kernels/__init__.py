"""Triton kernels of fastdpo and their thin launchers (installed as ``fastdpo.kernels``)."""
