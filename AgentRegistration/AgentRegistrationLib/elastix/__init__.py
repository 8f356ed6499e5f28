"""elastix."""
