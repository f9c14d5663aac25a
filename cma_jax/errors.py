"""Errors that name bad input: the entry points print their message as one `error:` line."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint or weights file that is not one we understand, misses tensors, or is damaged."""


class CheckpointMismatch(ValueError):
    """A sound checkpoint made for another model or training configuration (not damage: never skipped)."""


class DoesNotFit(ValueError):
    """A configuration whose compiled step needs more memory per chip than the chip has (cma_jax.compile)."""


class TrainingDiverged(ValueError):
    """The loss or gradient norm became non-finite (or spiked): the run stopped before saving that state."""


def listing(source: str, missing=(), unexpected=(), bad_shapes=()) -> CheckpointError:
    """One CheckpointError listing what is missing, unexpected or of the wrong shape in `source`."""
    lines = [f"{source}: not a usable checkpoint."]
    if missing:
        lines.append(f"missing ({len(missing)}): " + ", ".join(sorted(missing)))
    if unexpected:
        lines.append(f"unexpected ({len(unexpected)}): " + ", ".join(sorted(unexpected)))
    if bad_shapes:
        lines.append(f"wrong shapes ({len(bad_shapes)}): " + ", ".join(sorted(bad_shapes)))
    return CheckpointError("\n  ".join(lines))
