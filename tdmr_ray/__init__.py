"""tdmr-ray: foundation models to small edge models (TDMR, GDFQ) and keeping them good (CEMA), on Ray."""
__version__ = "0.1.0"
