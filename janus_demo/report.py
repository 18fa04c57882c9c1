"""The demo report: per-task loss curves across the three stages, the final held-out evaluation
(understanding accuracy, generation token and scene accuracy, image grid) -> ``report.md``.

    python -m janus_demo.report --out demo_out [--runs demo_out/runs/tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from janus_demo.metrics import SCENE_METRICS
from janus_train.config import STAGES

TASK_KEYS = ("loss/text", "loss/und", "loss/gen")
EVAL_KEYS = (
    "und/accuracy",
    "gen/token_accuracy",
    "gen/object_token_accuracy",
    "gen/scene_accuracy",
    "gen/unseen_object_accuracy",
)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a ``metrics.jsonl`` (a resumed run may repeat steps: the last one wins)."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "step" in rec:
                by_step.setdefault(rec["step"], {}).update(rec)
    return [by_step[s] for s in sorted(by_step)]


def plot_losses(runs: Path, out_png: Path) -> dict[str, dict[str, float]]:
    """Training loss per task over the stages (x: global step); returns each stage's last
    logged loss per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    offset, last = 0, {}
    colors = {"loss/text": "tab:green", "loss/und": "tab:blue", "loss/gen": "tab:red"}
    for stage in STAGES:
        path = runs / stage / "metrics.jsonl"
        if not path.exists():
            continue
        recs = [r for r in read_metrics(path) if "loss" in r]
        if not recs:
            continue
        for key in TASK_KEYS:
            pts = [(offset + r["step"], r[key]) for r in recs if r.get(key) is not None]
            if pts:
                x, y = zip(*pts)
                ax.plot(
                    x,
                    y,
                    color=colors[key],
                    label=key
                    if stage == "stage1" or key not in ax.get_legend_handles_labels()[1]
                    else None,
                )
        last[stage] = {k: recs[-1][k] for k in TASK_KEYS if recs[-1].get(k) is not None}
        end = offset + recs[-1]["step"]
        ax.axvline(end, color="gray", ls=":", lw=1)
        ax.text(
            (offset + end) / 2,
            0.98,
            stage,
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="top",
            color="gray",
        )
        offset = end
    ax.set_xlabel("optimizer step (stages back to back)")
    ax.set_ylabel("cross-entropy (token mean)")
    ax.set_yscale("log")
    ax.set_title("tiny Janus on the demo world: training loss per task")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return last


SWEEP = (1.0, 2.0, 5.0)
"""Guidance scales whose greedy token accuracy the report also shows."""


def final_eval(
    export: Path, eval_dir: Path, n_und: int, n_gen: int, guidance: float
) -> dict[str, float]:
    """``run_eval`` on the final export with more held-out items than in training, generating
    with the stage's ``eval.guidance_scale`` (plus a token-accuracy sweep)."""
    from janus_train.config import compose, resolve_stage, to_run_config
    from janus_train.evaluate import run_eval
    from janus_train.sample import load

    extra = ",".join(str(s) for s in SWEEP if s != guidance)
    run = to_run_config(
        compose(
            [
                "experiment=tiny",
                "stage=stage3",
                f"model.init_from={export}",
                "model.tokenizer=null",
                f"eval.guidance_scale={guidance}",
                f"eval.metrics=[{SCENE_METRICS}]",
                "eval.max_per_source=64",
                f"eval.n_und={n_und}",
                f"eval.n_gen={n_gen}",
                "eval.n_grid=12",
                f"eval.extra_guidance_scales=[{extra}]",
            ]
        )
    )
    model, processor = load(export)
    spec = resolve_stage(run)
    metrics = run_eval(model, processor, spec, run.model, run.data, run.eval, -1, eval_dir)
    # The same held-out questions asked with nothing but transformers and the export's template.
    from janus_train.evaluate import eval_recipe, normalize_answer, understanding_items

    items = understanding_items(eval_recipe(run.eval), spec.prompt, n_und)
    answers_path = eval_dir / "answers.jsonl"
    if items and answers_path.exists():
        ours = [json.loads(x)["answer"] for x in answers_path.read_text().splitlines()]
        hf = plain_transformers_answers(
            export, [i[0] for i in items], [i[1] for i in items], run.eval.max_new_tokens
        )
        metrics["und/accuracy_plain_transformers"] = sum(
            normalize_answer(a) == normalize_answer(r) for a, (_, _, r) in zip(hf, items)
        ) / len(items)
        metrics["und/same_answers_as_janus_sample"] = sum(a == b for a, b in zip(hf, ours)) / len(
            items
        )
    return metrics


def plain_transformers_answers(
    export: Path, images: list, questions: list[str], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Greedy answers from the export with plain transformers only, as a user of the export
    would: ``JanusProcessor.apply_chat_template`` (the export's chat template) + ``generate``."""
    import torch
    from transformers import JanusForConditionalGeneration, JanusProcessor

    model = JanusForConditionalGeneration.from_pretrained(export, local_files_only=True).eval()
    processor = JanusProcessor.from_pretrained(export, local_files_only=True)
    out: list[str] = []
    for i in range(0, len(questions), batch_size):
        convs = [
            [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": im.convert("RGB")}]
                    + ([{"type": "text", "text": q}] if q else []),
                }
            ]
            for im, q in zip(images[i : i + batch_size], questions[i : i + batch_size])
        ]
        inputs = processor.apply_chat_template(
            convs,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True},
        )
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = gen[:, inputs["input_ids"].shape[1] :]
        out += [processor.decode(row, skip_special_tokens=True).strip() for row in new]
    return out


def stage_guidance(runs: Path) -> float:
    """``eval.guidance_scale`` of the stage-3 run (its ``config.yaml``), else the key's default."""
    from omegaconf import OmegaConf

    from janus_train.trainer.config import EvalConfig

    default = EvalConfig.guidance_scale
    path = runs / "stage3" / "config.yaml"
    if not path.exists():
        return default
    return float(OmegaConf.load(path).get("eval", {}).get("guidance_scale", default))


def stage_evals(runs: Path) -> dict[str, dict[str, float]]:
    """The last in-training evaluation of each stage (``eval/...`` keys in metrics.jsonl)."""
    out = {}
    for stage in STAGES:
        path = runs / stage / "metrics.jsonl"
        if path.exists():
            ev = [r for r in read_metrics(path) if any(k.startswith("eval/") for k in r)]
            if ev:
                out[stage] = {k[5:]: v for k, v in ev[-1].items() if k.startswith("eval/")}
    return out


def held_out_loss_section(
    evals: dict[str, dict[str, float]], last_train: dict[str, dict[str, float]]
) -> list[str]:
    """Held-out loss per stage, and why it can rise in stage 3 while accuracy does not fall."""
    lines = [
        "",
        "| stage | held-out loss/text | loss/und | loss/gen |",
        "|---|---|---|---|",
    ]
    for stage, d in evals.items():
        lines.append(f"| {stage} | " + " | ".join(_fmt(d.get(k)) for k in TASK_KEYS) + " |")
    s2, s3 = evals.get("stage2", {}), evals.get("stage3", {})
    rising = [k for k in TASK_KEYS if k in s2 and k in s3 and s3[k] > s2[k]]
    if rising:
        tr = last_train.get("stage3", {})
        lines += [
            "",
            f"Held-out {', '.join(rising)} rise from stage 2 to stage 3 while the accuracies "
            f"above move by {_fmt(s3.get('und/accuracy', 0) - s2.get('und/accuracy', 0))} "
            f"(understanding) and {_fmt(s3.get('gen/token_accuracy', 0) - s2.get('gen/token_accuracy', 0))} "
            "(generation tokens). Two things separate the two measures: stage 3's text task "
            "is chat conversations only (`data_recipes/tiny_stage3.yaml`), while the held-out "
            "text split is plain documents, which stage 3 no longer trains; and stage 3 fits "
            "its small SFT set almost exactly (last logged training loss text "
            f"{_fmt(tr.get('loss/text'))}, und {_fmt(tr.get('loss/und'))}), so the answers "
            "it still gets wrong on unseen combinations are given with more confidence. "
            "Cross-entropy grows without bound on a confident error while accuracy counts it "
            "once (our reading of these figures, not a separate measurement). The demo keeps "
            "the last checkpoint of each stage; it does not select on held-out loss.",
        ]
    return lines


def majority_baseline(answers_jsonl: Path) -> float | None:
    """Accuracy of answering each question type (text before " the ") with its most frequent
    reference answer: the best any image-blind constant answerer can do."""
    if not answers_jsonl.exists():
        return None
    by_type: dict[str, list[str]] = {}
    for line in answers_jsonl.read_text().splitlines():
        a = json.loads(line)
        by_type.setdefault(a["question"].split(" the ")[0], []).append(a["reference"])
    n = sum(len(v) for v in by_type.values())
    return sum(max(v.count(x) for x in v) for v in by_type.values()) / n if n else None


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _headline(final: dict, n_und: int, guidance: float, codebook, majority) -> list[str]:
    """Title, the held-out evaluation table, the image grid and the guidance sweep."""
    chance = _fmt(1 / codebook) if codebook else "-"
    return [
        "# janus_train demo: tiny Janus on a generated world",
        "",
        "Three stages (stage 1 adaptors + image head, stage 2 + LLM, stage 3 SFT + SigLIP) "
        "through `launch/pipeline.sh` (2 processes, DeepSpeed on CPU), on data from "
        "`python -m janus_demo.synth`; the tiny VQ was fitted on the training images and stayed "
        "frozen.",
        "",
        "## Held-out evaluation (unseen colour-shape-position combinations)",
        "",
        "| metric | value | chance |",
        "|---|---|---|",
        f"| understanding accuracy (exact answer, {n_und} questions) | "
        f"{_fmt(final.get('und/accuracy'))} | {_fmt(majority)} (best answer per question type) |",
        "| understanding accuracy, plain transformers (`apply_chat_template` on the export; "
        f"answers identical to janus-sample's: {_fmt(final.get('und/same_answers_as_janus_sample'))}) | "
        f"{_fmt(final.get('und/accuracy_plain_transformers'))} | |",
        f"| generation token accuracy (greedy, CFG {guidance:g}, vs reference VQ codes) | "
        f"{_fmt(final.get('gen/token_accuracy'))} | {chance} |",
        "| generation object-token accuracy (tokens whose reference code is not the blank "
        f"image's) | {_fmt(final.get('gen/object_token_accuracy'))} | {chance} |",
        "| token accuracy of drawing a blank image (baseline) | "
        f"{_fmt(final.get('gen/token_accuracy_blank_baseline'))} | |",
        f"| generation scene accuracy (colour + shape recognised in every quadrant) | "
        f"{_fmt(final.get('gen/scene_accuracy'))} | < 0.01 |",
        "| generation object accuracy (prompt's objects recognised at their position) | "
        f"{_fmt(final.get('gen/object_accuracy'))} | |",
        "| ... of the objects never seen at that position in training (unseen triples) | "
        f"{_fmt(final.get('gen/unseen_object_accuracy'))} | |",
        f"| held-out loss text / und / gen | {_fmt(final.get('loss/text'))} / "
        f"{_fmt(final.get('loss/und'))} / {_fmt(final.get('loss/gen'))} | |",
        "",
        "![generated images](final_eval/generated.png)",
        "",
        "Columns: reference image, greedy sample, two sampled images (temperature 1), all with "
        f"classifier-free guidance {guidance:g} (1 = none); rows: held-out prompts "
        "(`final_eval/generated.json`). Answers: `final_eval/answers.jsonl`.",
        "",
        "Generation token accuracy by guidance scale (greedy, same prompts): "
        + ", ".join(
            f"CFG {s:g}: {_fmt(final.get('gen/token_accuracy' if s == guidance else f'gen/token_accuracy@cfg{s:g}'))}"
            for s in sorted(set(SWEEP) | {guidance})
        )
        + ". In this tiny world guidance lowers accuracy: it subtracts (scale - 1) x the "
        "unconditional logits, which favour the frequent background code, so empty quadrants "
        "and common objects get overdrawn.",
    ]


def _training_loss_section(last: dict[str, dict[str, float]]) -> list[str]:
    lines = [
        "",
        "## Training loss per task",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "| stage | loss/text | loss/und | loss/gen (last logged step) |",
        "|---|---|---|---|",
    ]
    for stage, d in last.items():
        lines.append(
            f"| {stage} | {_fmt(d.get('loss/text'))} | {_fmt(d.get('loss/und'))} | "
            f"{_fmt(d.get('loss/gen'))} |"
        )
    return lines


def _stage_eval_section(evals: dict, last: dict) -> list[str]:
    if not evals:
        return []
    lines = [
        "",
        "## In-training evaluation (end of each stage)",
        "",
        "| stage | " + " | ".join(EVAL_KEYS) + " |",
        "|" + "---|" * (len(EVAL_KEYS) + 1),
    ]
    for stage, d in evals.items():
        lines.append(f"| {stage} | " + " | ".join(_fmt(d.get(k)) for k in EVAL_KEYS) + " |")
    lines += [
        "",
        "Stage 1 trains with plain framing (`<image><caption>`): its understanding "
        "figure is exact caption match, later stages answer questions.",
    ]
    return lines + held_out_loss_section(evals, last)


def _data_section(world: dict | None) -> list[str]:
    if not world:
        return []
    held = ", ".join(
        f"{h['colour']} {h['shape']} at the {h['position']}" for h in world["heldout_triples"][:6]
    )
    return [
        "",
        "## Data",
        "",
        f"Sample counts: `{json.dumps(world['counts'])}`. Held-out triples "
        f"(never in training): {held}, ... ({len(world['heldout_triples'])} in all).",
    ]


def _vq_section(vq_fit: Path) -> list[str]:
    if not vq_fit.exists():
        return []
    v = json.loads(vq_fit.read_text())
    return [
        "",
        "## Tiny VQ",
        "",
        f"Fitted for {v['fit']['steps']} steps on the training images: reconstruction "
        f"MSE (cosine code assignment -> HF `decode`, pixels in [-1, 1]) {v['mse_random']:.3f} random "
        f"-> {v['mse_fitted']:.3f} fitted; {v['codes_used']} of the codebook's codes "
        "in use. Frozen in all three stages.",
        "",
        "Local codes: each of the world's "
        f"{v.get('distinct_blocks', '-')} distinct 8x8 pixel blocks has its own code, which "
        "the encoder predicts whatever surrounds the block "
        f"(codes equal to the block's: {_fmt(v.get('code_agreement'))}; unchanged when the "
        f"quadrants are shuffled across images: {_fmt(v.get('code_consistency'))}); so an "
        "object has the same codes wherever it is drawn and the transformer can compose "
        "unseen colour-shape-position triples from seen parts. Held-out scenes whose "
        "reconstruction (codes -> `decode`) the recogniser reads exactly: "
        f"{_fmt(v.get('recognized_reconstructions'))} (the ceiling of the scene accuracy "
        "above).",
    ]


def _timings_section(timings: dict | None, eval_s: float) -> list[str]:
    if not timings:
        return []
    lines = ["", "## Timings (seconds)", "", "| phase | s |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    return lines + [f"| final evaluation | {eval_s:.0f} |"]


def write_report(
    out: Path, runs: Path, n_und: int = 200, n_gen: int = 100, timings: dict | None = None
) -> dict:
    """``OUT/report.md`` and ``OUT/summary.json``: the final evaluation of the stage-3 export
    beside the training curves, the in-training evaluations, the data and the tiny VQ."""
    out.mkdir(parents=True, exist_ok=True)
    last = plot_losses(runs, out / "loss_curves.png")
    t0 = time.time()
    guidance = stage_guidance(runs)
    final = final_eval(runs / "stage3" / "hf", out / "final_eval", n_und, n_gen, guidance)
    eval_s = time.time() - t0
    majority = majority_baseline(out / "final_eval" / "answers.jsonl")
    world_json = out / "data" / "world.json"
    world = json.loads(world_json.read_text()) if world_json.exists() else None
    cfg_path = runs / "stage3" / "hf" / "config.json"
    codebook = (
        json.loads(cfg_path.read_text())["vq_config"]["num_embeddings"]
        if cfg_path.exists()
        else None
    )
    evals = stage_evals(runs)
    lines = [
        *_headline(final, n_und, guidance, codebook, majority),
        *_training_loss_section(last),
        *_stage_eval_section(evals, last),
        *_data_section(world),
        *_vq_section(out / "init" / "vq_fit.json"),
        *_timings_section(timings, eval_s),
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    summary = {
        "final": final,
        "und_majority_baseline": majority,
        "last_train_loss": last,
        "stage_evals": evals,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    from janus_train.quiet import quiet_known_noise

    quiet_known_noise()
    ap = argparse.ArgumentParser(description="write the demo report")
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--runs", default=None, help="default OUT/runs/tiny")
    ap.add_argument("--n-und", type=int, default=200)
    ap.add_argument("--n-gen", type=int, default=100)
    ap.add_argument("--timings", default=None, help="JSON file: phase -> seconds")
    args = ap.parse_args(argv)
    out = Path(args.out)
    runs = Path(args.runs) if args.runs else out / "runs" / "tiny"
    timings = json.loads(Path(args.timings).read_text()) if args.timings else None
    os.environ.setdefault("JANUS_EVAL_DATA_ROOT", str(out / "data" / "heldout"))
    summary = write_report(out, runs, args.n_und, args.n_gen, timings)
    print(json.dumps(summary["final"]))


if __name__ == "__main__":
    main()
