"""Capture stores: the background writer (``writer``), what a store says about itself
(``metadata``), and reading (``reader``: slices with completeness and damage checks, built on
``zarrio``, a chunk reader for the Zarr v3 layouts dithooks writes). See docs/reading.md."""
