"""Backends: the only code that knows how a particular runtime stores and runs the model."""
