"""Console entry points: aria-train, aria-convert, aria-generate."""
