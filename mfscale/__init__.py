"""mfscale: distributed matrix-factorization training on MovieLens-shaped data."""

__version__ = "0.1.0"
