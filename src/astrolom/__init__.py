"""astrolom: Large Observation Models for astronomy (AstroPT and beyond)."""

__version__ = "0.1.0"
