"""Diffusers Wan checkpoint -> Triton model repository (`python export/build_engines.py --help`)."""
