"""custom package."""
