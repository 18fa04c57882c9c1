"""Known, harmless third-party noise, silenced by exact message at the entry points (never a
blanket filter): what a user reads in the logs should be ours or a real problem.

- transformers' Janus ``generate`` in text mode passes ``guidance_scale=None`` beside its own
  ``generation_config`` and keeps the default ``max_length`` beside our ``max_new_tokens``: two
  warnings per call that the caller cannot avoid (transformers 5.24, generation/utils.py).
- DeepSpeed's ZeRO calls ``torch.distributed.all_gather_into_tensor``, deprecated in torch 2.13.
- DeepSpeed's op-builder probes compile test programs and log each gcc line at INFO.
- transformers' "Loading weights" / "Writing model shards" bars when stderr is not a terminal
  (a log file gets one carriage-return line per load).
"""

from __future__ import annotations

import logging
import sys
import warnings

_HF_GENERATE_NOISE = (
    "Passing `generation_config` together with generation-related arguments",
    "Both `max_new_tokens`",
)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_known_noise() -> None:
    """Install the filters above (idempotent)."""
    gen_logger = logging.getLogger("transformers.generation.utils")
    if not any(isinstance(f, _DropMessages) for f in gen_logger.filters):
        gen_logger.addFilter(_DropMessages(_HF_GENERATE_NOISE))
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        category=FutureWarning,
    )
    logging.getLogger("compilers").setLevel(logging.WARNING)
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
