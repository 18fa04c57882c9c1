"""Mutation audit (issue 27): one-line bugs the suite must catch, each applied to a scratch copy
of the working tree, then the tests named for it run there. A mutation is *caught* when at least
one of those tests fails; the script prints which ones did.

    python benchmarks/mutations.py              # every mutation, one after another
    python benchmarks/mutations.py --only sig_ign_removed image_head_own_position
    python benchmarks/mutations.py --list

The scratch copy (``git ls-files``: tracked and untracked-not-ignored files) lives under the
system temp dir and is removed afterwards; the working tree is never modified. Tests run with
the copy first on ``PYTHONPATH`` and ``-p no:cacheprovider``. Multi-process tests take the
shared lock when ``JANUS_MP_LOCK`` names a lock file (``flock``). Exit status: 0 when every
mutation run was caught, 1 otherwise. Results in docs/testing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    edits: tuple[tuple[str, str], ...]
    """(old, new) pairs; each ``old`` must occur exactly once in ``path``."""
    tests: tuple[str, ...]
    """pytest arguments (files, ``-k`` expressions) that must catch it."""
    why: str
    dist: bool = False


MUTATIONS = [
    Mutation(
        "mask_2d_kept",
        "janus_train/model/forward.py",
        (("            attention_mask = None  # packed rows", "            pass  # packed rows"),),
        ("tests/test_packing.py",),
        "packed rows keep the 2-D padding mask: HF's flash path unpads by mask, ignores cu_seqlens",
    ),
    Mutation(
        "varlen_k_args_dropped",
        "janus_train/model/forward.py",
        (
            ('            "cu_seq_lens_k": self.cu_seqlens,\n', ""),
            ('            "max_length_k": self.max_seqlen,\n', ""),
        ),
        ("tests/test_packing.py",),
        "only the _q varlen arguments: HF falls back to causal attention over the whole row",
    ),
    Mutation(
        "liger_rms_norm_swiglu_off",
        "janus_train/model/kernels.py",
        (
            ("    rms_norm=True,", "    rms_norm=False,"),
            ("    swiglu=True,", "    swiglu=False,"),
        ),
        ("tests/test_kernels.py",),
        "model.kernels=liger no longer patches RMSNorm and SwiGLU",
    ),
    Mutation(
        "per_rank_normalisation",
        "janus_train/train.py",
        (
            (
                "    weights = step_weights(n_tokens, tc.loss_reduction)",
                "    weights = step_weights(local_n, tc.loss_reduction)",
            ),
        ),
        ("tests/test_train_dist.py", "-k", "grad_equivalence"),
        "the loss normalised by this rank's own supervised tokens, not the step's",
        dist=True,
    ),
    Mutation(
        "sig_ign_removed",
        "janus_train/data/workers.py",
        (("        signal.signal(sig, signal.SIG_IGN)", "        pass"),),
        ("tests/test_data_loader.py", "-k", "sigterm"),
        "loader workers die on the SIGTERM Slurm sends every process of the job",
    ),
    Mutation(
        "image_head_own_position",
        "janus_train/model/forward.py",
        (
            (
                "hidden.index_select(0, ix.code_pos)))",
                "hidden.index_select(0, ix.code_pos + 1)))",
            ),
        ),
        ("tests/test_model_forward.py",),
        "the image head reads the code's own position instead of the one before it",
    ),
]


def scratch_copy(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for f in filter(None, files):
        src = REPO / f.decode()
        if src.is_file():
            out = dest / f.decode()
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)


def apply(root: Path, m: Mutation) -> None:
    p = root / m.path
    text = p.read_text()
    for old, new in m.edits:
        n = text.count(old)
        if n != 1:
            raise SystemExit(f"{m.name}: {m.path} has {n} copies of {old!r} (the code moved?)")
        text = text.replace(old, new)
    p.write_text(text)


def run_tests(root: Path, m: Mutation, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "--tb=no", "-p", "no:cacheprovider"]
    cmd += list(m.tests)
    lock = os.environ.get("JANUS_MP_LOCK")
    if m.dist and lock:
        cmd = ["flock", lock, *cmd]
    env = dict(os.environ, PYTHONPATH=str(root))
    t0 = time.monotonic()
    try:
        res = subprocess.run(
            cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
        )
        out, rc = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired:
        out, rc = "", None
    failed = re.findall(r"^FAILED (\S+)", out, flags=re.M)
    errors = re.findall(r"^ERROR (\S+)", out, flags=re.M)
    summary = (re.findall(r"^=*\s*(\d+ (?:passed|failed).*?)\s*=*$", out, flags=re.M) or [""])[-1]
    return {
        "mutation": m.name,
        "caught": bool(failed or errors),
        "failed": failed + errors,
        "summary": summary if rc is not None else f"timed out after {timeout:.0f} s",
        "seconds": round(time.monotonic() - t0, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="mutation names")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=float, default=1200, help="per mutation, seconds")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if args.only is None or m.name in args.only]
    if args.only and len(chosen) != len(args.only):
        known = ", ".join(m.name for m in MUTATIONS)
        print(f"mutations.py: unknown name in --only (known: {known})", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.why}  [{' '.join(m.tests)}]")
        return 0
    results = []
    for m in chosen:
        with tempfile.TemporaryDirectory(prefix=f"janus-mut-{m.name}-") as tmp:
            root = Path(tmp)
            scratch_copy(root)
            apply(root, m)
            r = run_tests(root, m, args.timeout)
        results.append(r)
        print(json.dumps(r), flush=True)
    print("\nmutation                      caught  by")
    for r in results:
        by = ", ".join(r["failed"][:3]) + (" ..." if len(r["failed"]) > 3 else "")
        print(f"{r['mutation']:<30}{'yes' if r['caught'] else 'NO':<8}{by or r['summary']}")
    return 0 if all(r["caught"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
