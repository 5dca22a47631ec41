"""Model cards: a Markdown page that says what a trained model is, how it was made and where it
falls short, written from the records that came with it (checkpoint metadata, run directory).

`vitlab export --format folder|timm` puts one into the folder as README.md (with a "Use" section
for that format); every finished `vitlab train` run writes model-card.md into its run directory.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .classifier import Classifier
from .data.image import PREPROCESSING_RULE
from .rundir import TEACHER_FILE


def _pct(value) -> str:
    return f"{value:.2%}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "not recorded"


def _command_text(command) -> str | None:
    if not command:
        return None
    args = [str(a) for a in command]
    if Path(args[0]).name in ("vitlab", "__main__.py") or args[0].endswith("vitlab"):
        args[0] = "vitlab"
    return shlex.join(args)


def model_card(classifier: Classifier, *, title: str, intro: str, usage: list[str], location: str,
               run=None) -> str:
    """A model card in Markdown: what the model is and how it was made, from the checkpoint's
    metadata and (`run`, a vitlab.runs.RunSummary) its run directory. Every figure is quoted from
    those records; what they do not hold is said to be not recorded, never guessed.

    intro: the opening sentence (where the weights come from); usage: the "Use" section's lines;
    location: the path that the card's commands name (the folder or run directory)."""
    from .budget import format_duration

    meta = getattr(classifier, "metadata", None) or {}
    provenance = meta.get("provenance") if isinstance(meta.get("provenance"), dict) else {}
    config = classifier.model.config
    height, width = classifier.image_size
    names = list(classifier.class_names)
    shown_names = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    parameters = sum(p.numel() for p in classifier.model.parameters())
    pooling = "the [CLS] token" if config.pooling == "cls" else "the mean of the patch tokens"
    rule = PREPROCESSING_RULE
    lines = [f"# {title}", ""]
    lines += [f"{intro} This card is generated from the records that came with the weights; figures it cannot "
              f"find are marked not recorded.", ""]
    lines += ["| | |", "| --- | --- |",
              f"| architecture | ViT: {config.patch_size}x{config.patch_size} patches, dim {config.dim}, {config.depth} "
              f"pre-norm blocks, {config.heads} heads, MLP {config.mlp_dim}, LayerNorm eps {config.norm_eps:g}, "
              f"head on {pooling}; {parameters:,} parameters |",
              f"| input | {height}x{width}, {config.in_channels} channel(s). Colour: {rule['colour']}. Size: {rule['resize']}. "
              f"Then {rule['normalise']} (mean/std in config.json) |",
              f"| output | {len(names)} classes: {shown_names} |", ""]
    lines += ["## Use", "", *usage]

    lines += ["## Data", ""]
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    source_data = provenance.get("data") or data.get("source") or (run.data if run else None)
    lines.append(f"- Trained on: {source_data or 'not recorded'}.")
    if data:
        val = data.get("val_size")
        held = (f"{val:,} images" if isinstance(val, int) else f"{val:.0%} of the images" if isinstance(val, float)
                else "vitlab's default share (5,000 of 50,000 images, else 10%)")
        lines.append(f"- Validation: {held} held out of the training images (stratified, split_seed "
                     f"{data.get('split_seed', 0)}) and never trained on; `vitlab eval {location} --data DATA` rebuilds "
                     f"the same split.")
    lines.append("")

    lines += ["## Training", ""]
    commands = provenance.get("commands") if isinstance(provenance.get("commands"), list) else []
    run_command = _command_text(run.command) if run else None
    if run_command and not commands:
        commands = [run_command]
    if commands:
        lines += ["```bash", *commands, "```", ""]
    else:
        lines += ["- Command: not recorded."]
    if run is not None:
        lines.append(f"- Recipe: {run.recipe or 'not recorded'}; model preset {run.model or 'not recorded'}; "
                     f"length {run.length or 'not recorded'}; {run.epochs_done or 0} epoch(s) finished.")
        teacher = (run.config.get("resolved") or {}).get("teacher")
        if isinstance(teacher, dict) and teacher.get("steps") is not None:
            score = (f", {teacher['val_top1']:.2%} validation top-1" if isinstance(teacher.get("val_top1"), float)
                     else "")
            lines.append(f"- Distilled (`--distill {run.config.get('distill')}`): a CNN teacher trained first, inside the "
                         f"same budget, for {teacher['steps']:,} steps ({teacher.get('epochs', 0):.1f} epochs, "
                         f"{teacher.get('seconds', 0):.0f} s){score}; the ViT learned half from the labels and half "
                         f"from the teacher's predictions. The weights here are a plain ViT; the teacher is in "
                         f"{TEACHER_FILE} in the run directory.")
        if run.train_seconds is not None:
            lines.append(f"- Time: {format_duration(run.train_seconds)} of training steps (evaluation excluded).")
        lines.append(f"- Machine: {run.machine or 'not recorded'}"
                     + (f" ({run.environment.get('processor')})" if run.environment.get("processor") else "")
                     + (f"; torch {run.environment.get('torch')}" if run.environment.get("torch") else "") + ".")
    if provenance:
        if provenance.get("training_minutes") is not None:
            lines.append(f"- Time: {provenance['training_minutes']} minutes of training.")
        labels = {"machine": "Machine", "epochs": "Epochs", "seed": "Seed", "vitlab_commit": "vitlab commit",
                  "date": "Date", "selection": "Weights chosen"}
        for key, label in labels.items():
            if provenance.get(key) is not None:
                lines.append(f"- {label}: {provenance[key]}.")
    if run is None and not provenance:
        lines.append("- Recipe, time and machine: not recorded (the checkpoint came without its run directory).")
    lines.append("")

    lines += ["## Validation", ""]
    epoch = f" (epoch {meta['epoch']})" if isinstance(meta.get("epoch"), int) else ""
    lines.append(f"- Top-1 on the validation split when training saved these weights: {_pct(meta.get('val_top1'))}{epoch}.")
    recorded = [f"{key} {_pct(value)}" for key, value in provenance.items() if key.startswith("val_top1")]
    if recorded:
        lines.append(f"- Recorded with the weights when they were published: {', '.join(recorded)}.")
    if run is not None and run.metrics:
        # with --eval-every only some epochs were evaluated: show those
        rows = [r for r in run.metrics if r.get("val_top1") is not None] or run.metrics
        shown = rows if len(rows) <= 8 else rows[:2] + [r for r in rows if r["epoch"] == run.best_epoch] + rows[-2:]
        lines += ["", "Per epoch (metrics.jsonl" + (", first, best and last epochs" if len(rows) > 8 else "") + "):",
                  "", "| epoch | val top-1 | EMA val top-1 | train loss |", "| --- | --- | --- | --- |"]
        seen = set()
        for row in shown:
            if row["epoch"] in seen:
                continue
            seen.add(row["epoch"])
            loss = row.get("train_loss")
            loss = f"{loss:.4f}" if isinstance(loss, float) else "-"
            lines.append(f"| {row['epoch']} | {_pct(row.get('val_top1'))} | {_pct(row.get('ema_val_top1'))} | {loss} |")
    lines.append("")

    lines += ["## Limitations", "",
              f"- Every image is converted to {height}x{width} first: small objects and fine detail are lost.",
              f"- {len(names)} classes only: an image of anything else is still given one of them, often with high "
              f"confidence; the probabilities are not calibrated for such images.",
              "- The figures above are validation figures: images held out of the training source, not an independent "
              "test set, and the best epoch was chosen on them. Expect lower accuracy on other cameras, framings or "
              f"drawings; measure on your own labelled images with `vitlab eval {location} --data my_images/`.", ""]
    if run is not None and run.time_budget_s is not None:
        lines.insert(-1, f"- Trained for a fixed time budget ({format_duration(run.time_budget_s)}) on {run.machine or 'one machine'}: "
                         f"the same command on other hardware trains a different number of epochs.")
    return "\n".join(lines)
