"""Client for R-Stitch serving: `RStitchClient` and the `rstitch` command line."""

from .client import GenerationResult, RStitchClient

__all__ = ["RStitchClient", "GenerationResult"]
