"""Peak memory and time of the heads' cross-entropy, all logits at once vs in chunks (CPU).

    PYTHONPATH=. python benchmarks/bench_loss.py                       # lm_head and image head
    PYTHONPATH=. python benchmarks/bench_loss.py --tokens 4096 --hidden 2048 --chunk 1024

One forward + backward of ``janus_train.model.loss.HeadLoss.group_sums`` (the training
forward's head loss) for a Linear head of the real vocabularies (text 102400, image 16384 codes),
fp32, on ``--tokens`` supervised tokens in three task groups, with ``chunk_tokens`` 0 (all
logits at once, the default) and ``--chunk``. Peak memory: the most bytes held at once by tensors
created during the step (a ``TorchDispatchMode`` tracking every new storage until it is freed;
the head's weight, its input and the gradients' first allocation excluded by a warm-up step), so
it measures the loss's own working memory on any device. Time: best of ``--repeats`` without the
meter. The losses and gradients of the two runs are compared too. ``--hidden`` below the real
2048 keeps the run short on CPU: it scales the matmuls (time) but not the logits (memory).
"""

from __future__ import annotations

import argparse
import json
import time
import weakref
from functools import partial

import torch
from torch.utils.weak import WeakIdKeyDictionary

from janus_train import compat
from janus_train.model.loss import HeadLoss


def _tensors(out) -> list:
    """The tensors of an aten op's result (a tensor, or tuples / lists of them)."""
    if isinstance(out, list | tuple):
        return [t for o in out for t in _tensors(o)]
    return [out] if isinstance(out, torch.Tensor) else []


class PeakLiveBytes(compat.torch_dispatch_mode()):
    """Peak bytes of storages created under the mode and still alive."""

    def __init__(self, preexisting) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen = WeakIdKeyDictionary()
        for t in preexisting:
            if t is not None:
                self.seen[t.untyped_storage()] = None

    def _freed(self, n: int, _ref) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _tensors(out):
            st = t.untyped_storage()
            if st not in self.seen:
                n = st.nbytes()
                self.seen[st] = weakref.ref(st, partial(self._freed, n))
                self.live += n
                self.peak = max(self.peak, self.live)
        return out


def measure(vocab: int, args, chunk: int) -> dict:
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(args.hidden, vocab, bias=vocab != 102400)  # lm_head has no bias
    with torch.no_grad():  # the same head for both runs
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * args.hidden**-0.5)
    x = torch.randn(args.tokens, args.hidden, generator=g).requires_grad_()
    target = torch.randint(0, vocab, (args.tokens,), generator=g)
    group = torch.randint(0, 3, (args.tokens,), generator=g)
    loss = HeadLoss(chunk)

    def step():
        s = loss.group_sums(x, head, target, group, 3)
        (s * torch.tensor([0.5, 1.0, 2.0])).sum().backward()
        return s.detach()

    step()  # gradients exist from here on: the measured step accumulates into them
    tensors = [x, x.grad, target, group, *head.parameters()]
    tensors += [p.grad for p in head.parameters()]
    meter = PeakLiveBytes(tensors)
    with meter:
        step()
    times = []
    for _ in range(args.repeats):
        for t in (x, *head.parameters()):
            t.grad = None
        t0 = time.perf_counter()
        s = step()
        times.append(time.perf_counter() - t0)
    grads = [x.grad.clone(), *(p.grad.clone() for p in head.parameters())]
    return {"peak": meter.peak, "time": min(times), "loss": s, "grads": grads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="supervised tokens in the step")
    ap.add_argument("--hidden", type=int, default=512, help="head input width (Janus-Pro: 2048)")
    ap.add_argument("--chunk", type=int, default=512, help="model.loss_chunk_tokens")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    for name, vocab in (("lm_head", 102400), ("image head", 16384)):
        full = measure(vocab, args, 0)
        chunked = measure(vocab, args, args.chunk)
        loss_err = (chunked["loss"] - full["loss"]).abs().max().item()
        grad_err = max(
            ((a - b).abs().max() / b.abs().max()).item()
            for a, b in zip(chunked["grads"], full["grads"])
        )
        print(
            json.dumps(
                {
                    "head": name,
                    "vocab": vocab,
                    "tokens": args.tokens,
                    "hidden": args.hidden,
                    "chunk": args.chunk,
                    "full_peak_mib": round(full["peak"] / 2**20, 1),
                    "chunked_peak_mib": round(chunked["peak"] / 2**20, 1),
                    "peak_ratio_chunked_over_full": round(chunked["peak"] / full["peak"], 3),
                    "full_s": round(full["time"], 3),
                    "chunked_s": round(chunked["time"], 3),
                    "time_ratio_chunked_over_full": round(chunked["time"] / full["time"], 3),
                    "max_loss_abs_diff": loss_err,
                    "max_grad_rel_diff": grad_err,
                }
            )
        )


if __name__ == "__main__":
    main()
