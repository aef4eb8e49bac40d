"""Deployment bundles: artifacts turned into what a serving stack loads (a Triton model repository)."""
