"""Client for R-Stitch serving: `RStitchClient` and the `rstitch` command line."""

from .client import GenerationResult, OptionNotForPolicy, RStitchClient, make_spec

__all__ = ["RStitchClient", "GenerationResult", "OptionNotForPolicy", "make_spec"]
