"""Held-out understanding accuracy of HF exports on the demo world, asked the same way for each:
the stage-2 export a LoRA stage 3 starts from, and that run's merged ``hf/`` export (and,
optionally, its unmerged ``adapter/`` on the stage-2 export through peft).

    python benchmarks/lora_demo.py --base demo_out/runs/tiny/stage2/hf \
        --lora demo_out/runs/tiny_lora/stage3 [--n-und 200] [--out lora.json]

Reads the held-out split from ``JANUS_EVAL_DATA_ROOT`` (``launch/demo_lora.sh`` sets it). Every
export is asked the same questions with the stage-3 prompt format (exact-match accuracy, as the
demo report's ``und/accuracy``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def und_accuracy(model, processor, export: Path, n_und: int) -> tuple[float, int]:
    from janus_train import sample as S
    from janus_train.config import compose, prompt_format, to_run_config
    from janus_train.evaluate import eval_recipe, normalize_answer, understanding_items

    run = to_run_config(
        compose(
            ["experiment=tiny", "stage=stage3", f"model.init_from={export}", "model.tokenizer=null"]
        )
    )
    fmt = prompt_format(run)
    items = understanding_items(eval_recipe(run.eval), fmt, n_und)
    preds = S.answer(model, processor, [i[0] for i in items], [i[1] for i in items], fmt)
    right = sum(normalize_answer(p) == normalize_answer(i[2]) for p, i in zip(preds, items))
    return right / len(items), len(items)


def main(argv: list[str] | None = None) -> None:
    from janus_train.sample import load

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the stage-2 HF export the LoRA run started from")
    ap.add_argument("--lora", required=True, help="the stage-3 run dir (hf/, adapter/ if LoRA)")
    ap.add_argument("--n-und", type=int, default=200)
    ap.add_argument("--out", default=None, help="also write the result as JSON here")
    args = ap.parse_args(argv)
    base, run_dir = Path(args.base), Path(args.lora)
    res: dict = {"n_und": args.n_und}
    t0 = time.perf_counter()
    model, proc = load(base)
    res["stage2_export"], res["questions"] = und_accuracy(model, proc, base, args.n_und)
    model, proc = load(run_dir / "hf")
    res["stage3_hf"], _ = und_accuracy(model, proc, run_dir / "hf", args.n_und)
    if (run_dir / "adapter").is_dir():  # the same model rebuilt by peft from adapter/
        from peft import PeftModel

        model, proc = load(base)
        model = PeftModel.from_pretrained(model, str(run_dir / "adapter")).eval()
        model = model.base_model.model
        res["stage3_adapter_via_peft"], _ = und_accuracy(model, proc, base, args.n_und)
    res["eval_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
