"""The step loader interface: everything the training loop asks of its data, declared once.

The loaders implement it structurally (no base class): ``FixedStepLoader`` and
``TokenStepLoader`` (``janus_train/data/step_loaders.py``, WebDataset shards) and
``SyntheticStepLoader`` (``janus_train/data/synthetic_loader.py``). ``tests/test_step_loader.py``
checks every loader class of ``janus_train.data`` against it, signatures included, so an
interface that drifts fails there rather than in a training run.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class StepLoader(Protocol):
    """This rank's micro-batches, one optimizer step at a time, resumable exactly.

    A loader's state is plain Python (the token-budget loader's queued samples included), saved
    with every checkpoint, one per rank (``trainer_state_rank{r}.pt``).
    """

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next optimizer step (the batch contract,
        ``janus_train.batch``). Their number may change from step to step but is the same on
        every rank. Collective where the ranks balance their samples."""
        ...

    def finish(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A micro-batch's last step, after it has been moved to the device (e.g. uint8 pixels
        to the contract's float tensors)."""
        ...

    def counters(self) -> dict[str, int]:
        """This rank's cumulative counts (``samples/<source>``, ``skipped/<source>/<reason>``,
        ...); the trainer sums them over ranks."""
        ...

    def state_dict(self) -> dict:
        """This rank's position: what :meth:`load_state_dict` needs to continue exactly."""
        ...

    def load_state_dict(self, sd: dict) -> None:
        """Continue exactly from this rank's own ``state_dict()`` (collective where the ranks
        balance their samples)."""
        ...

    def can_resume_exactly(self, sd: dict) -> bool:
        """Whether :meth:`load_state_dict` can take ``sd`` (this rank's saved state); if not, the
        trainer calls :meth:`load_resharded` with every old rank's state."""
        ...

    def load_resharded(self, sds: list[dict]) -> None:
        """Continue from the states of every rank (in rank order) of a run with another layout
        (world size, loader workers)."""
        ...

    def close(self) -> None:
        """Stop any background workers. Safe to call twice; the next ``next_step()`` starts
        again at the current position."""
        ...
