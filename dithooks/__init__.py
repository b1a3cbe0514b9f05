"""dithooks: see inside a Diffusion Transformer while it samples."""

__version__ = "0.1.0"
