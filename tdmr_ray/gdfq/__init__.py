"""GDFQ (Xu et al., ECCV 2020): data-free low-bit quantization with a knowledge-matching generator."""
