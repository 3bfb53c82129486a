"""Errors the user can act on. Every message says what was wrong and what to pass instead."""


class SliderError(ValueError):
    """Bad input: a prompt set, a config value, a model folder or a slider file."""


class FamilyMismatchError(SliderError):
    """A slider trained for one base model family applied to another."""


class TrainingDivergedError(RuntimeError):
    """The loss or the gradients became NaN/inf; training stopped, the last good checkpoint is kept."""
