"""The words of the error a user can act on, dug out of the exceptions libraries wrap it in."""

from __future__ import annotations


def root_cause(err: BaseException) -> str:
    """The innermost error of ``err``'s chain, in a few words: the OS's own ("No space left on
    device", with the file), also when a library wrapped it. torch.distributed.checkpoint
    collects each rank's exception, ``datasets`` re-raises the reader's, and torch.save's zip
    writer reports a full disk only as a bad position."""
    failures = getattr(err, "failures", None)  # torch.distributed.checkpoint's CheckpointException
    if failures:
        err = next(iter(failures.values()))[0]
    while (inner := err.__cause__ or (None if err.__suppress_context__ else err.__context__)) is not None:
        err = inner  # "raise ... from None" ends the chain: its author chose the words
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    if "unexpected pos" in str(err):
        return "a short write: the disk is probably full"
    first_line = (str(err).splitlines() or [""])[0][:200]
    return f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__
