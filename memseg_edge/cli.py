"""The ``memseg-edge`` command line: one command per step of the pipeline, each a thin layer over a
Python function that a test can call directly. Importing this module never imports torch: the
training commands import the trainer only when they run."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__


def _need_trainer():
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(
            f"this command needs the trainer ({exc.name} is not installed): pip install 'memseg-edge[train]'")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="memseg-edge")
def main():
    """MemSeg surface-defect detection: train on good parts only, evaluate, and (next) export and run
    at the line.

    \b
    Typical flow:
      memseg-edge synth-preview --data ROOT --category NAME --out preview.png
      memseg-edge train --data ROOT --category NAME --out runs/NAME
      memseg-edge eval runs/NAME/checkpoint.pt --data ROOT --category NAME --json metrics.json --plots plots/
    """


def _data_options(f):
    f = click.option("--layout", type=click.Choice(["mvtec", "folder"]), default=None,
                     help="mvtec: ROOT/CATEGORY/{train/good,test,ground_truth} (default). folder: ROOT holds good "
                          "images; --test-dir/--mask-dir name the test set.")(f)
    f = click.option("--test-dir", type=click.Path(file_okay=False), default=None,
                     help="With --layout folder: one sub-folder per defect type (good = defect-free).")(f)
    f = click.option("--mask-dir", type=click.Path(file_okay=False), default=None,
                     help="With --layout folder: masks as <defect>/<image stem>_mask.png.")(f)
    f = click.option("--category", default=None, help="MVTec AD category (e.g. bottle).")(f)
    f = click.option("--data", "data_root", type=click.Path(exists=True, file_okay=False), required=True,
                     help="Dataset root (MVTec AD root, or the folder of good images with --layout folder).")(f)
    return f


@main.command()
@_data_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Run folder: checkpoint.pt and config.yaml are written here.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML config (sections data, model, synthesis, train, eval); options below override it.")
@click.option("--backbone", type=click.Choice(["resnet18", "mobilenet_v2"]), default=None,
              help="Encoder (default resnet18, the paper's).")
@click.option("--backbone-weights", default=None,
              help="'imagenet' (torchvision's weights; default), a local state_dict file, or 'none' "
                   "(random: for tests only, accuracy is meaningless).")
@click.option("--textures", type=click.Path(exists=True, file_okay=False), default=None,
              help="Texture folder for the texture anomaly source (DTD layout). Without it, only the structure source.")
@click.option("--iterations", type=click.IntRange(min=1), default=None, help="Training iterations (default 2700, the paper's).")
@click.option("--batch-size", type=click.IntRange(min=2), default=None, help="Images per step, half synthetic (default 8).")
@click.option("--lr", type=float, default=None, help="Learning rate (default 0.04).")
@click.option("--memory-samples", type=click.IntRange(min=1), default=None, help="Memory bank size N (default 30).")
@click.option("--image-size", type=click.IntRange(min=32), default=None, help="Model input side, a multiple of 32 (default 256).")
@click.option("--device", default=None, help="cpu (default), cuda or cuda:N.")
@click.option("--seed", type=int, default=None, help="Seed for every random choice (default 0).")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Data-loading processes (default 1).")
@click.option("--foreground", type=click.Choice(["auto", "none", "threshold", "otsu"]), default="auto",
              help="Where synthetic anomalies may go: auto = the category's preset.")
@click.option("--foreground-threshold", type=click.IntRange(0, 255), default=None)
@click.option("--foreground-invert/--no-foreground-invert", default=None)
@click.option("--resume", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Continue from a checkpoint of this run.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(data_root, category, layout, test_dir, mask_dir, out_dir, config_file, backbone, backbone_weights, textures,
          iterations, batch_size, lr, memory_samples, image_size, device, seed, workers, foreground,
          foreground_threshold, foreground_invert, resume, quiet):
    """Train MemSeg on good images only; writes OUT/checkpoint.pt.

    The memory bank, the decision threshold (from held-out good images) and the full config are saved in
    the checkpoint. Several GPUs: torchrun --nproc-per-node G $(which memseg-edge) train ... --device cuda
    """
    _need_trainer()
    from .train.config import MemSegConfig, apply_overrides
    from .train.trainer import train as run_training

    cfg = MemSegConfig.load(config_file) if config_file else MemSegConfig()
    cfg = apply_overrides(cfg, {
        "data.root": data_root, "data.category": category, "data.layout": layout, "data.test_dir": test_dir,
        "data.mask_dir": mask_dir, "data.image_size": image_size,
        "model.backbone": backbone, "model.backbone_weights": backbone_weights, "model.memory_samples": memory_samples,
        "synthesis.textures": textures,
        "train.iterations": iterations, "train.batch_size": batch_size, "train.lr": lr, "train.device": device,
        "train.seed": seed, "train.num_workers": workers,
    })
    cfg.synthesis.foreground = _foreground(cfg, foreground, foreground_threshold, foreground_invert)
    try:
        run_training(cfg, out_dir, resume=resume, progress=not quiet)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc


def _foreground(cfg, method, threshold, invert):
    from dataclasses import replace

    from .train.synthesis import foreground_for

    fg = cfg.synthesis.foreground
    if method == "auto":
        fg = foreground_for(cfg.data.category) if cfg.data.category else fg
    else:
        fg = replace(fg, method=method)
    if threshold is not None:
        fg = replace(fg, threshold=threshold)
    if invert is not None:
        fg = replace(fg, invert=invert)
    return fg


@main.command("eval")
@click.argument("model", type=click.Path(exists=True))
@_data_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the metrics here.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False), default=None,
              help="Write ROC/PRO curves, a score histogram and overlays here.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_cmd(model, data_root, category, layout, test_dir, mask_dir, json_path, plots_dir, device, batch_size, quiet):
    """Evaluate MODEL (a checkpoint.pt or its run folder) on the test images.

    Prints and writes image AUROC (image score = mean of the top-100 map pixels), pixel AUROC, AUPRO
    (to FPR 0.3, normalised), F1-max, per defect type, and the false-reject and miss rates at the
    model's own threshold. Fractions in [0, 1] in the JSON.
    """
    _need_trainer()
    from .train.config import DataConfig
    from .train.evaluate import evaluate

    data = DataConfig(root=data_root, category=category or "", layout=layout or "mvtec", test_dir=test_dir or "",
                      mask_dir=mask_dir or "")
    try:
        evaluate(model, data, json_path=json_path, plots_dir=plots_dir, device=device, batch_size=batch_size,
                 progress=not quiet)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("synth-preview")
@_data_options
@click.option("--out", "out_file", type=click.Path(dir_okay=False), required=True, help="PNG file to write.")
@click.option("--textures", type=click.Path(exists=True, file_okay=False), default=None,
              help="Texture folder (DTD layout) for the texture source.")
@click.option("--count", type=click.IntRange(min=1), default=16, show_default=True, help="Samples in the grid.")
@click.option("--image-size", type=click.IntRange(min=32), default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--foreground", type=click.Choice(["auto", "none", "threshold", "otsu"]), default="auto",
              show_default=True, help="auto = the category's preset.")
@click.option("--foreground-threshold", type=click.IntRange(0, 255), default=None, help="Grey level for 'threshold'.")
@click.option("--foreground-invert/--no-foreground-invert", default=None, help="Flip the foreground mask.")
@click.option("--open-kernel", type=click.IntRange(min=0), default=None, help="Opening kernel side (0 = off).")
@click.option("--close-kernel", type=click.IntRange(min=0), default=None, help="Closing kernel side (0 = off).")
def synth_preview(data_root, category, layout, test_dir, mask_dir, out_file, textures, count, image_size, seed,
                  foreground, foreground_threshold, foreground_invert, open_kernel, close_kernel):
    """Write a grid of synthetic anomalies beside their masks, to tune the foreground setting.

    The masks should fall on the product, not on the background; try --foreground threshold with
    --foreground-threshold and --foreground-invert until they do, then pass the same options to train.
    """
    from dataclasses import replace

    import cv2
    import numpy as np

    from .train.config import DataConfig, MemSegConfig
    from .train.datasets import discover, load_images
    from .train.synthesis import AnomalySynthesizer, preview_grid

    cfg = MemSegConfig(data=DataConfig(root=data_root, category=category or "", layout=layout or "mvtec"))
    cfg.synthesis.textures = textures or ""
    fg = _foreground(cfg, foreground, foreground_threshold, foreground_invert)
    if open_kernel is not None:
        fg = replace(fg, open_kernel=open_kernel)
    if close_kernel is not None:
        fg = replace(fg, close_kernel=close_kernel)
    cfg.synthesis.foreground = fg
    try:
        ds = discover(cfg.data)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(ds.train_good), size=min(count, len(ds.train_good)), replace=False)
    images = list(load_images([ds.train_good[i] for i in sorted(picks)], image_size))
    grid = preview_grid(images, AnomalySynthesizer(cfg.synthesis), rng)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out_file), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
        raise click.ClickException(f"could not write {out_file} (use a .png name)")
    click.echo(f"foreground: {fg}")
    click.echo(f"wrote {out_file} ({len(images)} samples)")


if __name__ == "__main__":
    sys.exit(main())
