"""Deterministic synthetic batches with the data loader's interface (``StepLoader``): tests,
benchmarks and smoke runs with no data on disk.

Every optimizer step holds ``global_batch`` rows whose tasks follow the stage ratio (largest
remainder, then a seeded shuffle). Row ``g`` of step ``s`` is generated from
``(seed, s, g)`` alone, and rank ``r`` takes rows ``(m * world + r) * micro + b`` for micro-batch
``m``: the step's data is the same whatever the split over ranks and accumulation, which is what
the gradient-equivalence test relies on. State = the step position.

Rows follow the batch contract of ``janus_train.model.forward`` (fixed length
``train.synthetic_seq_len``, right padding):

    text  BOS w1..wk EOS                         labels on w2..EOS
    und   BOS BOI IMG*n EOI a1..ak EOS           labels on a1..EOS, one pixel image
    gen   BOS p1..pk BOI c1..cn                  image-head targets c1..cn (odd rows: -1 codes
                                                 plus a [-1, 1] image for the VQ to encode)
"""

from __future__ import annotations

import torch

from janus_train.model.forward import IGNORE, TASK_IDS, TASKS
from janus_train.model.tokenizer import resolve_special_tokens


def _mix(*xs: int) -> int:
    """A seed from integers, identical in every process (unlike ``hash`` of a str)."""
    h = 0
    for x in xs:
        h = (h * 1_000_003 + x + 2**20) % (2**61 - 1)
    return h


def split_by_ratio(n: int, weights: dict[str, int]) -> list[str]:
    """``n`` task names in proportion to ``weights`` (largest remainder; ties by TASKS order)."""
    total = sum(weights.values())
    exact = {t: n * weights[t] / total for t in TASKS}
    counts = {t: int(exact[t]) for t in TASKS}
    rest = sorted(TASKS, key=lambda t: (-(exact[t] - counts[t]), TASKS.index(t)))
    for t in rest[: n - sum(counts.values())]:
        counts[t] += 1
    return [t for t in TASKS for _ in range(counts[t])]


class SyntheticStepLoader:
    """``next_step()`` -> ``grad_accum`` micro-batches (dicts of tensors) of this rank."""

    def __init__(self, run, processor, *, rank: int, world_size: int, micro_batch_size: int,
                 grad_accum: int, seq_len: int | None = None, seed: int | None = None):
        mc = run.model
        self.rank, self.world, self.micro, self.accum = rank, world_size, micro_batch_size, grad_accum
        self.seq_len = seq_len or run.train.synthetic_seq_len
        self.seed = run.data.seed if seed is None else seed
        self.n_img = mc.num_image_tokens
        self.image_size = mc.image_size
        self.codebook = mc.vq.num_embeddings
        tok = processor.tokenizer
        self.st = resolve_special_tokens(tok)
        special = set(vars(self.st).values())
        self.words = torch.tensor([i for i in range(len(tok)) if i not in special])
        r = run.hparams.ratio
        self.ratio = {"text": r.text, "und": r.und, "gen": r.gen}
        if self.seq_len < self.n_img + 8:
            raise ValueError(f"train.synthetic_seq_len={self.seq_len} < image tokens + 8")
        self.step = 0
        self.counts = {f"samples/synthetic_{t}": 0 for t in TASKS}

    # -- interface -----------------------------------------------------------------------
    def next_step(self) -> list[dict[str, torch.Tensor]]:
        tasks = self.tasks_for_step(self.step)
        out = []
        for m in range(self.accum):
            rows = []
            for b in range(self.micro):
                g = (m * self.world + self.rank) * self.micro + b
                rows.append(self.make_row(tasks[g], self.step, g))
                self.counts[f"samples/synthetic_{tasks[g]}"] += 1
            out.append(collate(rows))
        self.step += 1
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "counts": dict(self.counts)}

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["step"])
        self.counts = dict(sd["counts"])

    def counters(self) -> dict[str, int]:
        return {**self.counts, "skipped/synthetic": 0}

    def finish(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Device-side last step of the interface; synthetic pixels are already float."""
        return batch

    def close(self) -> None:
        pass

    # -- generation ----------------------------------------------------------------------
    def tasks_for_step(self, step: int) -> list[str]:
        n = self.micro * self.accum * self.world
        tasks = split_by_ratio(n, self.ratio)
        g = torch.Generator().manual_seed(_mix(self.seed, step, -1))
        return [tasks[i] for i in torch.randperm(n, generator=g).tolist()]

    def _words(self, g: torch.Generator, k: int) -> torch.Tensor:
        return self.words[torch.randint(len(self.words), (k,), generator=g)]

    def make_row(self, task: str, step: int, row: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(_mix(self.seed, step, row))
        st, T, n = self.st, self.seq_len, self.n_img
        ids = torch.full((T,), st.pad, dtype=torch.long)
        labels = torch.full((T,), IGNORE, dtype=torch.long)
        codes = torch.full((T,), IGNORE, dtype=torch.long)
        out: dict[str, torch.Tensor] = {}
        if task == "text":
            k = int(torch.randint(T // 2, T - 1, (1,), generator=g))
            seq = torch.cat([torch.tensor([st.bos]), self._words(g, k), torch.tensor([st.eos])])
            length = len(seq)
            ids[:length] = seq
            labels[1:length] = seq[1:]
        elif task == "und":
            k = int(torch.randint(2, T - n - 4, (1,), generator=g))
            head = torch.tensor([st.bos, st.boi] + [st.image] * n + [st.eoi])
            ans = torch.cat([self._words(g, k), torch.tensor([st.eos])])
            length = len(head) + len(ans)
            ids[:length] = torch.cat([head, ans])
            labels[len(head):length] = ans
            out["pixel_values"] = torch.randn(1, 3, self.image_size, self.image_size, generator=g)
        else:
            k = int(torch.randint(1, T - n - 2, (1,), generator=g))
            head = torch.cat([torch.tensor([st.bos]), self._words(g, k), torch.tensor([st.boi])])
            ids[: len(head)] = head
            start, length = len(head), len(head) + n
            if row % 2:
                codes[start:length] = -1
                px = torch.rand(1, 3, self.image_size, self.image_size, generator=g) * 2 - 1
                out["gen_pixel_values"] = px
            else:
                codes[start:length] = torch.randint(self.codebook, (n,), generator=g)
        mask = torch.zeros(T, dtype=torch.long)
        mask[:length] = 1
        task_ids = torch.full((T,), -1, dtype=torch.long)
        task_ids[:length] = TASK_IDS[task]
        out.update(input_ids=ids, attention_mask=mask, labels=labels, image_codes=codes,
                   task_ids=task_ids)
        return out


_ROW_KEYS = ("input_ids", "attention_mask", "labels", "image_codes", "task_ids")
_IMAGE_KEYS = ("pixel_values", "gen_pixel_values")


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-row (T,) tensors -> one (B, T) batch; images concatenated in row order."""
    return concat_batches([{k: v if k in _IMAGE_KEYS else v[None] for k, v in r.items()}
                           for r in rows])


def concat_batches(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Micro-batches of equal length -> one batch (images keep row-major order)."""
    out = {k: torch.cat([b[k] for b in batches]) for k in _ROW_KEYS}
    for k in _IMAGE_KEYS:
        imgs = [b[k] for b in batches if k in b]
        if imgs:
            out[k] = torch.cat(imgs)
    return out
