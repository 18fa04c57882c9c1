"""The known third-party noise is dropped by exact message; other warnings still reach the user."""

from __future__ import annotations

import logging
import warnings

from janus_train.quiet import quiet_known_noise


class _Keep(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_known_noise_dropped_other_messages_kept():
    quiet_known_noise()
    quiet_known_noise()  # idempotent: one filter
    log = logging.getLogger("transformers.generation.utils")
    assert len(log.filters) == 1
    keep = _Keep()
    log.addHandler(keep)  # transformers' loggers do not propagate to the root
    try:
        log.warning("Passing `generation_config` together with generation-related arguments=x")
        log.warning("Both `max_new_tokens` (=4) and `max_length`(=20) seem to have been set.")
        log.warning("Setting `pad_token_id` to `eos_token_id`:1 for open-end generation.")
    finally:
        log.removeHandler(keep)
    assert [r.getMessage()[:7] for r in keep.records] == ["Setting"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_noise()  # the filter goes in front of "always"
        warnings.warn(
            "`torch.distributed.all_gather_into_tensor` is deprecated.", FutureWarning, stacklevel=1
        )
        warnings.warn("`torch.distributed.other` is deprecated.", FutureWarning, stacklevel=1)
    assert [str(w.message)[:25] for w in seen] == ["`torch.distributed.other`"]
