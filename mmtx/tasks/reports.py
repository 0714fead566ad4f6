"""What task parts log besides scalars, to whichever loggers the run has: text tables (a TSV in the run folder too),
confusion matrices and captioned media (TensorBoard, W&B)."""

from __future__ import annotations

from pathlib import Path

import torch

from mmtx.errors import optional
from mmtx.files import append_tsv


def log_text_table(trainer, key: str, columns: list[str], rows: list[list], append: bool = True,
                   loggers: bool = True) -> None:
    """Log a small table of text to every logger that can show one, and write it to `<run dir>/<key>.tsv`
    (appended to, or replaced with `append=False`; `loggers=False`: the file only).

    W&B gets a table, TensorBoard a markdown table; the TSV file serves the CSV
    logger and anyone reading the run folder.
    """
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers if loggers else []:
        kind = type(logger).__name__
        if kind == "WandbLogger":
            logger.log_text(key=key, columns=columns, data=rows, step=trainer.global_step)
        elif kind == "TensorBoardLogger":
            header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            body = "".join("| " + " | ".join(_md(v) for v in row) + " |\n" for row in rows)
            logger.experiment.add_text(key, header + body, global_step=trainer.global_step)
    # TSV as the csv module writes it (mmtx.files.TSV): a generated text's newlines and tabs are quoted, not lost
    append_tsv(Path(trainer.default_root_dir) / f"{key}.tsv", columns, rows, append=append)


def _md(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", "<br>")


def log_confusion_matrix(trainer, key: str, matrix, class_names: list[str]) -> None:
    """A confusion matrix (rows: true class, columns: predicted): W&B's interactive confusion-matrix plot,
    a figure in TensorBoard (torchmetrics' plot, counts in the cells), and a TSV in the run folder."""
    rows = [[name, *[int(v) for v in row]] for name, row in zip(class_names, matrix.tolist())]
    log_text_table(trainer, key, ["true \\ predicted", *class_names], rows, append=False, loggers=False)
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if type(logger).__name__ == "TensorBoardLogger":
            from torchmetrics.utilities.plot import plot_confusion_matrix

            size = min(12.0, 2.0 + 0.5 * len(class_names))
            fig, ax = plot_confusion_matrix(matrix.long(), add_text=len(class_names) <= 30, labels=list(class_names))
            fig.set_size_inches(size, size)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            logger.experiment.add_figure(key, fig, global_step=trainer.global_step, close=True)
        elif type(logger).__name__ == "WandbLogger":
            wandb = optional("wandb", "wandb", "logger=wandb")
            y_true = [i for i, row in enumerate(matrix.tolist()) for j, n in enumerate(row) for _ in range(int(n))]
            preds = [j for i, row in enumerate(matrix.tolist()) for j, n in enumerate(row) for _ in range(int(n))]
            plot = wandb.plot.confusion_matrix(y_true=y_true, preds=preds, class_names=class_names)
            logger.experiment.log({f"{key}_plot": plot, "trainer/global_step": trainer.global_step})


def log_media(trainer, key: str, captions: list[str], images=None, audio=None, sample_rate: int = 16000) -> None:
    """Labelled examples where a person would rather look than read: images (N, C, H, W) in [0, 1] or
    audio clips (1D tensors) with captions. W&B: images / audio with captions; TensorBoard: the images as
    one captioned grid (a figure), audio clips with their captions as text."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        kind = type(logger).__name__
        if kind == "WandbLogger":
            if images is not None:  # uint8 (H, W, C) arrays: wandb truncates float tensors to {0, 1}
                logger.log_image(key=key, images=list(to_uint8(images)), caption=captions, step=trainer.global_step)
            if audio is not None:
                wandb = optional("wandb", "wandb", "logger=wandb")
                clips = [wandb.Audio(a.numpy(), sample_rate=sample_rate, caption=c) for a, c in zip(audio, captions)]
                logger.experiment.log({key: clips, "trainer/global_step": trainer.global_step})
        elif kind == "TensorBoardLogger":
            writer, step = logger.experiment, trainer.global_step
            if images is not None:  # one figure: the images in a grid, each with its caption drawn above it
                writer.add_figure(key, captioned_grid(images, captions), global_step=step, close=True)
            else:
                for i, clip in enumerate(audio or []):
                    writer.add_audio(f"{key}/{i}", clip[None], global_step=step, sample_rate=sample_rate)
                writer.add_text(key, "\n\n".join(f"{i}: {c}" for i, c in enumerate(captions)), global_step=step)


def to_uint8(images):
    """Images (N, C, H, W) in [0, 1] as uint8 arrays (N, H, W, C), or (N, H, W) for one channel: the form every
    dashboard shows as it is (floats are scaled by guesses that differ between wandb, TensorBoard and PIL)."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    return (pixels[..., 0] if pixels.shape[-1] == 1 else pixels).cpu().numpy()


def captioned_grid(images, captions: list[str], columns: int = 8):
    """A matplotlib figure of images (N, C, H, W) in [0, 1] in a grid, each titled with its caption (a caption
    "true A / predicted B" is green when A == B, else red)."""
    from matplotlib.figure import Figure

    n = len(images)
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    fig = Figure(figsize=(1.9 * columns, 2.1 * rows), layout="constrained")
    for i, (image, caption) in enumerate(zip(images, captions)):
        ax = fig.add_subplot(rows, columns, i + 1)
        pixels = to_uint8(image[None])[0]  # (C, H, W) in [0, 1] -> (H, W[, C]) uint8
        ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        true, _, predicted = caption.removeprefix("true ").partition(" / predicted ")
        ax.set_title(caption.replace(" / ", "\n"), fontsize=8, color="black" if not predicted else
                     ("tab:green" if true == predicted else "tab:red"))
        ax.axis("off")
    return fig
