"""``janus-sample``: answer questions about images and generate images from prompts with any
HF-format export directory (``JanusForConditionalGeneration`` + ``JanusProcessor``, local).

    janus-sample --model DIR understand --image a.png --question "What color is ..." [...]
    janus-sample --model DIR generate --prompt "a red circle at the top left." --n 4 \
        --guidance 5 --temperature 1 --top-k 0 --top-p 1 --out samples/

Prompts come from the export's chat template, so a model is asked in the format it was trained
on; ``--style/--chat-template/--system-prompt`` override it (how: :mod:`janus_train.sample`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from janus_train.model.chat_template import ROLES, STYLES, PromptFormat
from janus_train.sample import SampleConfig, answer, generate_images, image_grid, load


def _stage_styles() -> str:
    """Each shipped stage's default understanding style, read from ``conf/stage/*.yaml`` (the
    source of truth), e.g. ``stage1 plain, stage2 qa, stage3 chat``. Only help text: a stage
    file it cannot read (a user's conf with Hydra ``defaults``) is left out, and no conf
    directory gives ``see conf/stage``, never an error of the command."""
    from omegaconf import OmegaConf

    from janus_train.config import CONF_DIR, StageConfig

    base = OmegaConf.structured(StageConfig)
    styles = []
    for p in sorted((CONF_DIR / "stage").glob("*.yaml")):
        try:
            styles.append(f"{p.stem} {OmegaConf.merge(base, OmegaConf.load(p)).und_format.value}")
        except Exception:  # noqa: BLE001,S112  # help text only
            continue
    return ", ".join(styles) or "see conf/stage"


def build_parser() -> argparse.ArgumentParser:
    from janus_train.cli_help import HelpFormatter, summary

    ap = argparse.ArgumentParser(
        prog="janus-sample", description=summary(__doc__), formatter_class=HelpFormatter
    )
    ap.add_argument("--model", required=True, help="HF-format export directory (a run's hf/)")
    ap.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (cuda when available)",
    )
    ap.add_argument(
        "--style",
        choices=STYLES,
        default=None,
        help="override the export's chat template (the stages' defaults, stage.und_format: "
        f"{_stage_styles()}; an experiment may override them)",
    )
    ap.add_argument(
        "--chat-template",
        choices=sorted(ROLES),
        default=None,
        help="override the export's roles (with --style chat; default then janus_pro)",
    )
    ap.add_argument(
        "--system-prompt",
        default=None,
        help="override the system prompt (with --style/--chat-template: DeepSeek's; '' none)",
    )
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per forward batch")
    sub = ap.add_subparsers(dest="mode", required=True)
    u = sub.add_parser(
        "understand",
        help="answer questions about images",
        formatter_class=HelpFormatter,
        description="Answer questions about images (greedy decoding), one answer per line.",
    )
    u.add_argument(
        "--image",
        action="append",
        required=True,
        help="image file; repeat, one per question (or one for all questions)",
    )
    u.add_argument("--question", action="append", required=True, help="question; repeat")
    u.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit")
    g = sub.add_parser(
        "generate",
        help="text-to-image with classifier-free guidance",
        formatter_class=HelpFormatter,
        description="Generate images from prompts with classifier-free guidance; saves PNGs "
        "and a grid in --out.",
    )
    g.add_argument("--prompt", action="append", required=True, help="prompt; repeat")
    g.add_argument("--n", type=int, default=1, help="images per prompt")
    g.add_argument("--guidance", type=float, default=5.0, help="CFG scale >= 1 (1 = none)")
    g.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy"
    )
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely codes; 0 = all")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = all")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--out", default="samples", help="output directory")
    return ap


def main(argv: list[str] | None = None) -> None:
    from janus_train.quiet import quiet_known_noise

    quiet_known_noise()
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.mode == "understand" and len(args.image) not in (1, len(args.question)):
        ap.error("give one --image per --question (or a single --image)")
    from janus_train.errors import run_cli

    run_cli(f"janus-sample {args.mode}", _run, args)


def _run(args) -> None:
    model, processor = load(args.model, args.device)
    fmt = None  # the export's own chat template
    if args.style or args.chat_template or args.system_prompt is not None:
        kw = {} if args.system_prompt is None else {"system_prompt": args.system_prompt}
        fmt = PromptFormat(args.style or "chat", args.chat_template or "janus_pro", **kw)
    if args.mode == "understand":
        paths = args.image * len(args.question) if len(args.image) == 1 else args.image
        images = [Image.open(p) for p in paths]
        answers = answer(
            model, processor, images, args.question, fmt, args.max_new_tokens, args.batch_size
        )
        for path, q, a in zip(paths, args.question, answers):
            print(json.dumps({"image": path, "question": q, "answer": a}))
        return
    cfg = SampleConfig(
        args.guidance, args.temperature, args.top_k, args.top_p, args.n, args.batch_size, args.seed
    )
    images = generate_images(model, processor, args.prompt, cfg, fmt)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        p, k = divmod(i, args.n)
        path = out / f"prompt{p:03d}_{k:02d}.png"
        im.save(path)
        print(json.dumps({"prompt": args.prompt[p], "image": str(path)}))
    image_grid(images, cols=args.n, scale=max(1, 128 // images[0].size[0])).save(out / "grid.png")


if __name__ == "__main__":
    main()
