"""Warning filters: known-harmless notices and per-file progress bars that would bury a run's
progress display."""

from __future__ import annotations

import logging
import warnings

QUIET = (
    r".*ModelCheckpoint with manual optimization.*",
    r".*LeafSpec.*",
    r".*module\(s\) in eval mode.*",
    r".*anonymous setting has no effect.*",
    r".*does not have many workers.*",
    r".*resuming from a checkpoint that ended before the epoch ended.*",  # prompts are a function of the step
    r".*Checkpoint directory .* exists and is not empty.*",  # a resumed run writes into its own folder
)


def _drop_advert(record: logging.LogRecord) -> bool:
    return "litlogger" not in str(record.msg)


def quiet() -> None:
    """Install the filters (idempotent)."""
    from transformers.utils import logging as hf_logging

    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" for a 6 MB model
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _drop_advert not in rank_zero.filters:
        rank_zero.addFilter(_drop_advert)
