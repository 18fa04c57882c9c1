"""Deterministic synthetic batches behind the step loader interface
(``janus_train.step_loader.StepLoader``): tests, benchmarks and smoke runs with no data on disk.

Every optimizer step holds ``global_batch`` rows whose tasks follow the stage ratio (largest
remainder, then a seeded shuffle). Row ``g`` of step ``s`` is generated from
``(seed, s, g)`` alone, and rank ``r`` takes rows ``(m * world + r) * micro + b`` for micro-batch
``m``: the step's data is the same whatever the split over ranks and accumulation, which is what
the gradient-equivalence test relies on. State = the step position.

With ``tokens_per_micro`` (``train.tokens_per_micro`` > 0, the default) the step holds
``global_batch_size`` samples ``g = 0..G-1``, generated the same way; every rank computes every
sample's length (a cheap draw, no row built), assigns the step's samples to ranks balancing
tokens (``janus_train.data.packing.assign_balanced``) and packs its share into micro-batches of
one row of at most ``tokens_per_micro`` tokens (``position_ids`` restart per sample); every rank
returns the same number of micro-batches (empty ones where it has fewer). The step's samples
are again independent of world size and packing.

Samples are ``janus_train.batch.Sample`` s put together by the one ``janus_train.batch.collate``
(fixed length ``train.synthetic_seq_len``, right padding, no ``position_ids``; packed rows are
unpadded):

    text  BOS w1..wk EOS                         labels on w2..EOS
    und   BOS BOI IMG*n EOI a1..ak EOS           labels on a1..EOS, one pixel image
    gen   BOS p1..pk BOI c1..cn                  image-head targets c1..cn (odd rows: -1 codes
                                                 plus a [-1, 1] image for the VQ to encode)
"""

from __future__ import annotations

import torch

from janus_train.batch import (
    CODE_FROM_PIXELS,
    IGNORE,
    TASKS,
    BatchPlan,
    Sample,
    collate,
    empty_batch,
    task_counts,
)
from janus_train.data.packing import assign_balanced, layout
from janus_train.model.config import ModelConfig
from janus_train.model.tokenizer import resolve_special_tokens

JANUS_MIX = {"und": (20, 300), "gen": (10, 80), "text": (98, 4094)}
"""Text tokens of a sample per task (inclusive): answers of understanding samples, prompts of
generation samples, text documents (100-4096 tokens with BOS/EOS)."""


def _mix(*xs: int) -> int:
    """A seed from integers, identical in every process (unlike ``hash`` of a str)."""
    h = 0
    for x in xs:
        h = (h * 1_000_003 + x + 2**20) % (2**61 - 1)
    return h


def split_by_ratio(n: int, weights: dict[str, int]) -> list[str]:
    """``n`` task names in proportion to ``weights``: the loaders' one splitter
    (``janus_train.batch.task_counts``), listed in ``TASKS`` order."""
    counts = task_counts(weights, n)
    return [t for t in TASKS for _ in range(counts[t])]


class SyntheticStepLoader:
    """``next_step()`` -> ``grad_accum`` micro-batches (dicts of tensors) of this rank."""

    def __init__(
        self,
        processor,
        model: ModelConfig,
        plan: BatchPlan,
        ratio: dict[str, int],
        *,
        rank: int,
        seq_len: int,
        length_mix: str = "uniform",
        seed: int = 0,
        text_lengths: dict[str, tuple[int, int]] | None = None,
    ):
        """``plan``: the stage's batch (``global_batch_size`` rows per step; fixed
        ``micro_batch_size`` x ``grad_accum`` rows per rank, or token-budget micro-batches);
        ``ratio``: the stage's ``{"und", "text", "gen"}`` ratio; ``seq_len``, ``length_mix``:
        ``train.synthetic_seq_len`` / ``synthetic_length_mix``; ``seed``: ``data.seed``."""
        self.rank, self.world = rank, plan.world_size
        self.micro, self.accum = plan.micro_batch_size, plan.grad_accum
        self.seq_len = seq_len
        self.tokens_per_micro = plan.tokens_per_micro
        self.global_batch = plan.global_batch_size
        if text_lengths is None and length_mix == "janus":
            text_lengths = {
                task: (min(lo, hi_cap), min(hi, hi_cap))
                for task, (lo, hi), hi_cap in (
                    ("und", JANUS_MIX["und"], self.seq_len - model.num_image_tokens - 4),
                    ("gen", JANUS_MIX["gen"], self.seq_len - model.num_image_tokens - 2),
                    ("text", JANUS_MIX["text"], self.seq_len - 2),
                )
            }
        elif length_mix not in ("uniform", "janus"):
            raise ValueError(f"train.synthetic_length_mix={length_mix!r}: uniform | janus")
        self.text_lengths = text_lengths
        """Optional ``{task: (lo, hi)}``: text tokens of a sample (inclusive), instead of the
        defaults derived from ``seq_len``."""
        self.seed = seed
        self.n_img = model.num_image_tokens
        self.image_size = model.image_size
        self.codebook = model.vq.num_embeddings
        tok = processor.tokenizer
        self.st = resolve_special_tokens(tok)
        special = set(vars(self.st).values())
        self.words = torch.tensor([i for i in range(len(tok)) if i not in special])
        self.ratio = dict(ratio)
        if self.seq_len < self.n_img + 8:
            raise ValueError(f"train.synthetic_seq_len={self.seq_len} < image tokens + 8")
        self.pad_id = self.st.pad
        self.step = 0
        self.counts = {f"samples/synthetic_{t}": 0 for t in TASKS}

    # -- interface -----------------------------------------------------------------------
    def next_step(self) -> list[dict[str, torch.Tensor]]:
        if self.tokens_per_micro:
            return self._next_packed_step()
        tasks = self.tasks_for_step(self.step)
        out = []
        for m in range(self.accum):
            rows = []
            for b in range(self.micro):
                g = (m * self.world + self.rank) * self.micro + b
                rows.append(self.make_row(tasks[g], self.step, g))
                self.counts[f"samples/synthetic_{tasks[g]}"] += 1
            out.append(
                collate([[r] for r in rows], self.pad_id, length=self.seq_len, position_ids=False)
            )
        self.step += 1
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "counts": dict(self.counts)}

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["step"])
        self.counts = dict(sd["counts"])

    def can_resume_exactly(self, sd: dict) -> bool:  # noqa: ARG002
        return True  # rows are a function of (step, global row): any world size continues

    def load_resharded(self, sds: list[dict]) -> None:
        """Continue from the states of another world size: the same step; the old ranks'
        counts summed on rank 0 (totals over ranks stay consistent)."""
        self.step = int(sds[0]["step"])
        self.counts = {k: 0 for k in self.counts}
        if self.rank == 0:
            for sd in sds:
                for k, v in sd["counts"].items():
                    self.counts[k] = self.counts.get(k, 0) + int(v)

    def counters(self) -> dict[str, int]:
        return {**self.counts, "skipped/synthetic": 0}

    def finish(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Device-side last step of the interface; synthetic pixels are already float."""
        return batch

    def close(self) -> None:
        pass

    def _next_packed_step(self) -> list[dict[str, torch.Tensor]]:
        tasks = self.tasks_for_step(self.step)
        lengths = [self.row_length(t, self.step, g) for g, t in enumerate(tasks)]
        shares = assign_balanced(lengths, self.world)
        lay = layout([[lengths[g] for g in share] for share in shares], self.tokens_per_micro)
        mine = shares[self.rank]
        out = []
        for pack in lay.packs[self.rank]:
            rows = []
            for i in pack:
                g = mine[i]
                rows.append(self.make_row(tasks[g], self.step, g))
                self.counts[f"samples/synthetic_{tasks[g]}"] += 1
            out.append(
                collate([rows], self.pad_id) if rows else empty_batch(self.pad_id, self.image_size)
            )
        self.step += 1
        return out

    # -- generation ----------------------------------------------------------------------
    def tasks_for_step(self, step: int) -> list[str]:
        n = self.global_batch
        tasks = split_by_ratio(n, self.ratio)
        g = torch.Generator().manual_seed(_mix(self.seed, step, -1))
        return [tasks[i] for i in torch.randperm(n, generator=g).tolist()]

    def _words(self, g: torch.Generator, k: int) -> torch.Tensor:
        return self.words[torch.randint(len(self.words), (k,), generator=g)]

    def _text_range(self, task: str) -> tuple[int, int]:
        """[lo, hi) of the text tokens k of a sample of ``task``."""
        if self.text_lengths and task in self.text_lengths:
            lo, hi = self.text_lengths[task]
            return lo, hi + 1
        T, n = self.seq_len, self.n_img
        return {"text": (T // 2, T - 1), "und": (2, T - n - 4), "gen": (1, T - n - 2)}[task]

    def _draw_k(self, task: str, g: torch.Generator) -> int:
        lo, hi = self._text_range(task)
        return int(torch.randint(lo, hi, (1,), generator=g))

    def row_length(self, task: str, step: int, row: int) -> int:
        """Tokens of sample ``row`` of ``step`` without building it (the row's first draw)."""
        k = self._draw_k(task, torch.Generator().manual_seed(_mix(self.seed, step, row)))
        return k + {"text": 2, "und": self.n_img + 4, "gen": self.n_img + 2}[task]

    def make_row(self, task: str, step: int, row: int) -> Sample:
        """Sample ``row`` of ``step`` (unpadded, ``row_length`` tokens), from its seed alone."""
        g = torch.Generator().manual_seed(_mix(self.seed, step, row))
        st, n = self.st, self.n_img
        k = self._draw_k(task, g)
        if task == "text":
            ids = torch.cat([torch.tensor([st.bos]), self._words(g, k), torch.tensor([st.eos])])
            labels = torch.cat([torch.tensor([IGNORE]), ids[1:]])
            return Sample(ids, labels, task)
        if task == "und":
            head = torch.tensor([st.bos, st.boi] + [st.image] * n + [st.eoi])
            ans = torch.cat([self._words(g, k), torch.tensor([st.eos])])
            labels = torch.cat([torch.full((len(head),), IGNORE), ans])
            px = torch.randn(1, 3, self.image_size, self.image_size, generator=g)[0]
            return Sample(torch.cat([head, ans]), labels, task, und_images=[px])
        head = torch.cat([torch.tensor([st.bos]), self._words(g, k), torch.tensor([st.boi])])
        ids = torch.cat([head, torch.full((n,), st.pad)])
        if row % 2:
            img_codes = torch.full((n,), CODE_FROM_PIXELS)
            px = torch.rand(1, 3, self.image_size, self.image_size, generator=g)[0] * 2 - 1
        else:
            img_codes, px = torch.randint(self.codebook, (n,), generator=g), None
        codes = torch.cat([torch.full((len(head),), IGNORE), img_codes])
        return Sample(ids, torch.full((len(ids),), IGNORE), task, codes, gen_image=px)
