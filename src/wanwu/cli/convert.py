"""``wanwu convert``: a PyTorch model (ModelScope folder or hub id) to an ONNX model folder."""

from __future__ import annotations

from pathlib import Path

import click

from wanwu.cli.options import prompt_option
from wanwu.convert import DEFAULT_OPSET, DEFAULT_TOLERANCE, ConvertOptions, convert, describe


@click.command("convert")
@click.option(
    "-m", "--model", "model", metavar="SRC", default=None,
    help="A ModelScope model folder or modelscope:OWNER/NAME[@REV], or a Chinese-CLIP folder / hf:OWNER/NAME "
    "(with --labels; the labels and prompts are built into the ONNX model). Default: the 万物识别 general model.",
)
@prompt_option
@click.option("-l", "--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Label file (overrides the model folder's).")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The model folder to write (model.onnx, labels.txt, wanwu.json).")
@click.option("--fp16", is_flag=True, help="Store the weights as float16 (half the size).")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset.")
@click.option(
    "--tolerance", type=float, default=None,
    help=f"Largest allowed |torch - onnx| logit difference (default {DEFAULT_TOLERANCE[False]:g}, "
    f"{DEFAULT_TOLERANCE[True]:g} with --fp16).",
)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def command(model: str | None, labels: Path | None, prompts: tuple[str, ...], output: Path, fp16: bool,
            opset: int, tolerance: float | None, force: bool) -> int:
    """Convert a PyTorch model to ONNX, checking that both give the same logits.

    The folder loads with  wanwu recognize --model OUTPUT  and runs on ONNX Runtime (no torch needed).
    """
    options = ConvertOptions(model=model, output=output, labels=labels, prompts=prompts, fp16=fp16, opset=opset,
                             tolerance=tolerance, force=force)
    report = convert(options)
    click.echo(describe(report), err=True)
    return 0
