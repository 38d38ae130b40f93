"""The ``memseg-edge`` command line: one command per step of the pipeline, each a thin layer over a
Python function that a test can call directly. Importing this module never imports torch: the
training commands import the trainer only when they run."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .threads import apply_threads, threads_option


def _need_trainer():
    """Fail with the install command when PyTorch is absent (checked without importing it)."""
    import importlib.util

    for name in ("torch", "torchvision"):
        if importlib.util.find_spec(name) is None:
            raise click.ClickException(
                f"this command needs the trainer ({name} is not installed): pip install 'memseg-edge[train]'")


def _need_matplotlib():
    """--plots draws with matplotlib, which only the trainer extra installs: say so before any work."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise click.ClickException("--plots needs matplotlib, which is not installed (it comes with the trainer "
                                   "extra): pip install 'memseg-edge[train]', or leave out --plots")


def _checkpoint_path(value: str, command: str) -> Path:
    """A checkpoint argument (checkpoint.pt or its run folder) -> the .pt file, refusing the files that are
    mistaken for one (a bundle's ONNX file, an engine, a bundle folder) with the command that takes them."""
    path = Path(value)
    bundle_like = path.suffix in (".onnx", ".engine") or (path.is_dir() and (path / "model.json").is_file())
    if bundle_like:
        what = "an engine" if path.suffix == ".engine" else "already an exported model (a bundle or one of its ONNX files)"
        raise click.ClickException(
            f"{path} is {what}, not a checkpoint: {command} takes the checkpoint.pt that `memseg-edge train` wrote "
            "(or its run folder); use this file directly with eval, run, predict, calibrate or build-engine")
    if path.is_dir():
        path = path / "checkpoint.pt"
        if not path.is_file():
            raise click.ClickException(f"{value} holds no checkpoint.pt: give a run folder made by `memseg-edge train` "
                                       "or the checkpoint file itself")
    return path


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="memseg-edge")
def main():
    """MemSeg surface-defect detection: train on good parts only, evaluate, export to ONNX, quantize,
    and build TensorRT engines for the line.

    \b
    Typical flow:
      memseg-edge synth-preview --data ROOT --category NAME --out preview.png
      memseg-edge train --data ROOT --category NAME --out runs/NAME
      memseg-edge eval runs/NAME/checkpoint.pt --data ROOT --category NAME --json metrics.json --plots plots/
      memseg-edge export runs/NAME --out bundles/NAME
      memseg-edge calibrate bundles/NAME --images ROOT/NAME/train/good --fp16
      memseg-edge build-engine bundles/NAME --precision int8 --out NAME.int8.engine
      memseg-edge predict bundles/NAME IMAGES... --out predictions/

    \b
    Or from checkpoint to engine in one step (export and calibration as needed):
      memseg-edge build-engine runs/NAME --precision int8 --images ROOT/NAME/train/good
    """


def _data_options(f, required: bool = True):
    f = click.option("--layout", type=click.Choice(["mvtec", "folder"]), default=None,
                     help="mvtec: ROOT/CATEGORY/{train/good,test,ground_truth} (default). folder: ROOT holds good "
                          "images; --test-dir/--mask-dir name the test set.")(f)
    f = click.option("--test-dir", type=click.Path(file_okay=False), default=None,
                     help="With --layout folder: one sub-folder per defect type (good = defect-free).")(f)
    f = click.option("--mask-dir", type=click.Path(file_okay=False), default=None,
                     help="With --layout folder: masks as <defect>/<image stem>_mask.png.")(f)
    f = click.option("--category", default=None, help="MVTec AD category (e.g. bottle).")(f)
    f = click.option("--data", "data_root", type=click.Path(exists=True, file_okay=False), required=required,
                     help="Dataset root (MVTec AD root, or the folder of good images with --layout folder)."
                          + ("" if required else " Default: the --config file's data.root."))(f)
    return f


def _data_options_optional(f):
    return _data_options(f, required=False)


@main.command()
@_data_options_optional
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
              help="Texture folder for the texture anomaly source (DTD layout: one sub-folder per class of .jpg). "
                   "Required, unless the config names one or --no-textures is given.")
@click.option("--no-textures", is_flag=True,
              help="Train with the structure anomaly source only (the paper measured about 0.8 image and 1.5 pixel "
                   "AUROC points lost).")
@click.option("--iterations", type=click.IntRange(min=1), default=None, help="Training iterations (default 2700, the paper's).")
@click.option("--batch-size", type=click.IntRange(min=2), default=None, help="Images per step, half synthetic (default 8).")
@click.option("--lr", type=float, default=None, help="Learning rate (default 0.04).")
@click.option("--memory-samples", type=click.IntRange(min=1), default=None, help="Memory bank size N (default 30).")
@click.option("--image-size", type=click.IntRange(min=32), default=None, help="Model input side, a multiple of 32 (default 256).")
@click.option("--device", default=None, help="cpu (default), cuda or cuda:N.")
@click.option("--seed", type=int, default=None, help="Seed for every random choice (default 0).")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Data-loading processes (default 1).")
@click.option("--foreground", type=click.Choice(["auto", "none", "threshold", "otsu"]), default="auto",
              help="Where synthetic anomalies may go: auto = the config file's setting, or the category's preset "
                   "where the config has none.")
@click.option("--foreground-threshold", type=click.IntRange(0, 255), default=None)
@click.option("--foreground-invert/--no-foreground-invert", default=None)
@click.option("--resume", type=click.Path(exists=True), default=None,
              help="Continue a stopped run from its checkpoint (OUT/checkpoint.pt or the run folder), with the "
                   "same options; checkpoints are written every train.checkpoint_every iterations (500).")
@click.option("--overwrite", is_flag=True,
              help="Train afresh into an --out that already holds a checkpoint (without it, that is refused).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@threads_option
def train(data_root, category, layout, test_dir, mask_dir, out_dir, config_file, backbone, backbone_weights, textures,
          no_textures, iterations, batch_size, lr, memory_samples, image_size, device, seed, workers, foreground,
          foreground_threshold, foreground_invert, resume, overwrite, quiet, threads):
    """Train MemSeg on good images only; writes OUT/checkpoint.pt.

    The memory bank, the decision threshold (from held-out good images) and the full config are saved in
    the checkpoint. Several GPUs: torchrun --nproc-per-node G $(which memseg-edge) train ... --device cuda
    """
    _need_trainer()
    from .train.config import MemSegConfig, apply_overrides
    from .train.trainer import train as run_training

    apply_threads(threads)   # again, now that torch is imported

    if textures and no_textures:
        raise click.UsageError("--textures and --no-textures contradict each other: give one")
    try:
        cfg = MemSegConfig.load(config_file) if config_file else MemSegConfig()
    except (ValueError, OSError) as exc:
        raise click.ClickException(f"{config_file}: {exc}") from exc
    if not (data_root or cfg.data.root):
        raise click.UsageError("Missing option '--data' (the dataset root; or a --config file whose data.root names it).")
    if no_textures:
        from .train.synthesis import NO_TEXTURES
        textures = NO_TEXTURES
    cfg = apply_overrides(cfg, {
        "data.root": data_root, "data.category": category, "data.layout": layout, "data.test_dir": test_dir,
        "data.mask_dir": mask_dir, "data.image_size": image_size,
        "model.backbone": backbone, "model.backbone_weights": backbone_weights, "model.memory_samples": memory_samples,
        "synthesis.textures": textures,
        "train.iterations": iterations, "train.batch_size": batch_size, "train.lr": lr, "train.device": device,
        "train.seed": seed, "train.num_workers": workers,
    })
    cfg.synthesis.foreground = _foreground(cfg, foreground, foreground_threshold, foreground_invert)
    if resume is not None and Path(resume).is_dir():
        resume = str(Path(resume) / "checkpoint.pt")
    existing = Path(out_dir) / "checkpoint.pt"
    if resume is None and existing.is_file() and not overwrite:
        raise click.ClickException(f"{out_dir} already holds a run ({_describe_run(existing)}): continue it with "
                                   f"--resume {existing}, train afresh over it with --overwrite, or give another --out")
    try:
        run_training(cfg, out_dir, resume=resume, progress=not quiet)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc


def _describe_run(path: Path) -> str:
    """``iteration 1200 of 2700, unfinished`` for a checkpoint; what is wrong with it when it cannot be read."""
    from .train.checkpoint import read_checkpoint

    try:
        ckpt = read_checkpoint(path)
    except (ValueError, OSError) as exc:
        return f"a checkpoint that cannot be used: {exc}"
    total = ckpt["config"].get("train", {}).get("iterations")
    done = ckpt.get("iteration")
    if isinstance(done, int) and isinstance(total, int):
        return f"iteration {done} of {total}, " + ("unfinished" if done < total else "finished")
    return f"iteration {done}"


def _foreground(cfg, method, threshold, invert):
    """The foreground setting: ``auto`` takes the category's preset only where the config still has the
    default (a config file's own foreground always wins); explicit options override either."""
    from dataclasses import replace

    from .train.config import ForegroundConfig
    from .train.synthesis import foreground_for

    fg = cfg.synthesis.foreground
    if method == "auto":
        if cfg.data.category and fg == ForegroundConfig():
            fg = foreground_for(cfg.data.category)
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
@click.option("--device", default="cpu", show_default=True,
              help="Where a checkpoint runs: cpu, cuda or cuda:N (bundles run with onnxruntime on the CPU, engines on "
                   "their GPU).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@threads_option
def eval_cmd(model, data_root, category, layout, test_dir, mask_dir, json_path, plots_dir, device, batch_size, quiet,
             threads):
    """Evaluate MODEL on the test images: a checkpoint.pt or its run folder (PyTorch), a model
    bundle folder or one of its ONNX files, e.g. BUNDLE/model.int8.onnx (onnxruntime, no PyTorch), or a
    TensorRT engine FILE.engine built by build-engine (on its GPU; the sidecar is checked first).

    Prints and writes image AUROC (image score = mean of the top-100 map pixels), pixel AUROC, AUPRO
    (to FPR 0.3, normalised), F1-max, per defect type, and the false-reject and miss rates at the
    model's own threshold. Fractions in [0, 1] in the JSON.
    """
    is_checkpoint = not (Path(model).suffix in (".onnx", ".engine") or (Path(model) / "model.json").is_file())
    if is_checkpoint:
        _need_trainer()
    if plots_dir:
        _need_matplotlib()
    if is_checkpoint and device.startswith("cuda"):
        from .train.trainer import check_cuda_device
        try:
            check_cuda_device(device)
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from exc
    from .engine import EngineError
    from .train.config import DataConfig
    from .train.evaluate import evaluate

    apply_threads(threads)   # again: a checkpoint imported torch

    data = DataConfig(root=data_root, category=category or "", layout=layout or "mvtec", test_dir=test_dir or "",
                      mask_dir=mask_dir or "")
    try:
        evaluate(model, data, json_path=json_path, plots_dir=plots_dir, device=device, batch_size=batch_size,
                 progress=not quiet)
    except (FileNotFoundError, ValueError, EngineError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Bundle folder to write.")
@click.option("--opset", type=click.IntRange(min=17), default=17, show_default=True, help="ONNX opset.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime-against-PyTorch check after export.")
@click.option("--plugin", is_flag=True,
              help="Also write model.plugin.onnx: the memory-bank step as one memseg::MemoryArgminL2 node (the fused "
                   "kernel) for `build-engine --plugin`.")
def export(checkpoint, out_dir, opset, no_verify, plugin):
    """Export CHECKPOINT (checkpoint.pt or its run folder) to a model bundle: OUT/model.onnx + OUT/model.json.

    The graph takes RGB uint8 images [N, H, W, 3] at the model's size and returns anomaly_map
    [N, 1, H, W] and score [N] (top-k mean); dynamic batch; memory bank inside. The export is checked
    against PyTorch with onnxruntime (max |difference| <= 1e-4) unless --no-verify.
    """
    _need_trainer()
    from .train.export import export_bundle

    path = _checkpoint_path(checkpoint, "export")
    click.echo(f"exporting {path} to {out_dir}" + ("" if no_verify else ", then checking it against PyTorch"))
    try:
        export_bundle(path, out_dir, opset=opset, verify=not no_verify, log=click.echo)
        if plugin:
            from .plugin_rewrite import write_plugin_variants
            write_plugin_variants(out_dir, precisions=("fp32",), log=click.echo)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=None,
              help="The product's good training images (its train/good; never test images). INT8 is calibrated on "
                   "them (all but the held-out ones) into BUNDLE/model.int8.onnx; every variant made gets its own "
                   "threshold from the held-out ones.")
@click.option("--num", type=click.IntRange(min=1), default=64, show_default=True, help="Calibration images to use.")
@click.option("--method", type=click.Choice(["entropy", "percentile", "minmax"]), default="entropy", show_default=True,
              help="How activation ranges are chosen from the calibration images.")
@click.option("--fp16", "fp16", is_flag=True,
              help="Write BUNDLE/model.fp16.onnx (no images needed; with --images it gets its own threshold).")
@click.option("--keep-fp32", multiple=True, help="Node-name prefix to keep in FP32 as well (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for picking calibration images.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@threads_option
def calibrate(bundle, images, num, method, fp16, keep_fp32, seed, quiet, threads):
    """Make precision variants of a bundle: INT8 (--images) and/or FP16 (--fp16).

    INT8: explicit quantization (QuantizeLinear/DequantizeLinear), symmetric (zero points 0, as TensorRT
    needs), per-channel weights, calibrated on your good images. The memory-bank step, the frozen encoder
    that feeds it, the feature fusion that reads its differences, the input normalisation and the
    softmax/score stay FP32; the decoder's convolutions are INT8 (with MobileNetV2 at 256 px about 68 % of
    the multiply-adds; the command prints the share and model.json records it). FP16: weights and activations
    in FP16 with the same parts kept in FP32, the encoder included. Check each with `memseg-edge eval BUNDLE/<file>`.
    A variant made again replaces the previous one: the command says so, removes the plugin variants made
    from it, and engines built from it are refused by run and eval until rebuilt.

    Thresholds: FP16 and INT8 move every score a little, so a variant's verdicts at the threshold chosen
    in FP32 at training can reject more good parts or miss more defects. With --images, the held-out good
    images the bundle lists (never trained on) are found there, checked to give back the training
    threshold with model.onnx, scored with the variant, and the training rule (same target false-reject
    rate) gives the variant its own threshold, which run, predict, eval and build-engine then use.
    """
    if not images and not fp16:
        raise click.UsageError("nothing to do: give --images DIR (INT8) and/or --fp16")
    from .calibration.fp16 import convert_fp16
    from .calibration.int8 import quantize_int8

    try:
        if images:
            quantize_int8(bundle, images, num=num, method=method, keep_fp32=list(keep_fp32) or None, seed=seed,
                          progress=not quiet, log=click.echo)
        if fp16:
            convert_fp16(bundle, keep_fp32=list(keep_fp32) or None, log=click.echo, images=images)
    except ImportError as exc:
        raise click.ClickException(f"calibration needs onnx and onnxruntime: pip install 'memseg-edge[onnx]' ({exc})")
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("build-engine")
@click.argument("source", metavar="MODEL", type=click.Path(exists=True))
@click.option("--out", "out", type=click.Path(), default=None,
              help="Engine file (or folder). Default: BUNDLE/model.<gpu>.<precision>.engine.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="Which ONNX variant to build: model.onnx, model.fp16.onnx (made if missing) or model.int8.onnx "
                   "(calibrated with --images if missing).")
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=None,
              help="Good images of the product: INT8 is calibrated on them when the bundle has no model.int8.onnx or "
                   "it was calibrated on other images; the engine is compared with the ONNX file on the first few.")
@click.option("--backend", type=click.Choice(["tensorrt", "tensorrt-rtx"]), default=None,
              help="TensorRT flavour. Default: tensorrt when it and a CUDA GPU are present, else tensorrt-rtx.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True, help="Largest batch the engine accepts.")
@click.option("--opt-batch", type=click.IntRange(min=1), default=None, help="Batch to optimise for (default: max batch).")
@click.option("--workspace", "workspace_mb", type=click.IntRange(min=1), default=None, help="Builder workspace limit in MB.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Timing cache file, read if present and written after the build (full TensorRT only).")
@click.option("--compute-capability", "compute_capabilities", multiple=True,
              help="TensorRT-RTX only: GPU architectures to build for, e.g. 8.6 (repeatable; default NVIDIA's list).")
@click.option("--plugin", is_flag=True,
              help="Replace the standard-op memory-bank step by the fused MemoryArgminL2 CUDA kernel (a TensorRT "
                   "plugin; fp32 and fp16). `memseg-edge run` registers it before loading such an engine.")
@click.option("--no-compare", is_flag=True, help="Skip running the engine against the ONNX file after the build.")
@click.option("--verbose", is_flag=True, help="Show TensorRT's info messages.")
def build_engine_cmd(source, out, precision, images, backend, max_batch, opt_batch, workspace_mb, timing_cache,
                     compute_capabilities, plugin, no_compare, verbose):
    """Build a TensorRT engine from MODEL, on the device that will run it.

    MODEL is a bundle folder, or a run folder / checkpoint.pt: then the bundle (RUN/bundle) is exported
    first when it is missing or older than the checkpoint, and INT8 is calibrated when needed, so

    \b
      memseg-edge build-engine runs/bottle --precision int8 --images ROOT/bottle/train/good

    goes from checkpoint to engine in one step (export, calibrate and build-engine stay separate commands
    for those who want control). Precision comes from the ONNX variant (TensorRT 11 builds strongly typed
    networks only); the engine gets a sidecar FILE.engine.json (TensorRT flavour and version, GPU,
    precision, batch range, sha256 of the source ONNX, and how the engine compared with it on a few images
    where this machine can run it) that the runtime checks before it loads the engine.
    """
    from .engine import EngineError, build_engine

    if opt_batch is not None and opt_batch > max_batch:
        raise click.BadParameter(f"--opt-batch {opt_batch} exceeds --max-batch {max_batch}")
    try:
        bundle = _bundle_for_engine(source, precision, images)
        build_engine(bundle, out, precision=precision, backend=backend, max_batch=max_batch, opt_batch=opt_batch,
                     workspace_mb=workspace_mb, timing_cache=timing_cache,
                     compute_capabilities=list(compute_capabilities) or None, plugin=plugin, verbose=verbose,
                     compare=not no_compare, compare_images=images, log=click.echo)
    except ImportError as exc:
        raise click.ClickException(f"this step needs onnx and onnxruntime ({exc.name} is not installed): "
                                   "pip install 'memseg-edge[onnx]'") from exc
    except (EngineError, FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc


def _bundle_for_engine(source: str, precision: str, images: str | None) -> Path:
    """The bundle folder build-engine builds from: ``source`` itself, or for a run folder / checkpoint.pt,
    RUN/bundle exported when missing or made from another checkpoint; model.int8.onnx calibrated on ``images``
    when it is missing or was calibrated on other images."""
    import json

    from .bundle import load_bundle, sha256_file

    path = Path(source)
    if path.suffix == ".onnx":
        path = path.parent
    if not (path.is_dir() and (path / "model.json").is_file()):
        ckpt = _checkpoint_path(source, "build-engine")
        path = ckpt.parent / "bundle"
        ckpt_sha = sha256_file(ckpt)
        meta_file = path / "model.json"
        recorded = json.loads(meta_file.read_text()).get("checkpoint_sha256") if meta_file.is_file() else None
        if recorded != ckpt_sha:
            _need_trainer()
            from .train.export import export_bundle

            click.echo(f"export: {ckpt} -> {path}" + (" (the bundle there was made from another checkpoint)"
                                                        if meta_file.is_file() else ""))
            export_bundle(ckpt, path, log=click.echo)
            meta = json.loads(meta_file.read_text())
            meta["checkpoint_sha256"] = ckpt_sha
            meta_file.write_text(json.dumps(meta, indent=2))
        else:
            click.echo(f"export: {path} is up to date with {ckpt}")
    if precision == "int8":
        bundle, _ = load_bundle(path)
        entry = bundle.meta.get("files", {}).get("model.int8.onnx")
        if images is None:
            if entry is None or not (path / "model.int8.onnx").is_file():
                raise click.ClickException(f"{path} has no model.int8.onnx: give --images DIR (good images of the "
                                           "product, never test images) to calibrate it")
        else:
            from .calibration.int8 import DEFAULT_NUM_IMAGES, hash_images, quantize_int8, select_images

            quiet = []
            wanted = hash_images(select_images(images, DEFAULT_NUM_IMAGES, 0, log=quiet.append,
                                               exclude=bundle.meta.get("holdout_images") or []))
            if entry is not None and entry.get("images_sha256") == wanted and (path / "model.int8.onnx").is_file():
                click.echo(f"calibrate: {path / 'model.int8.onnx'} was calibrated on these images already")
            else:
                click.echo(f"calibrate: INT8 on {images}")
                quantize_int8(path, images, log=click.echo)
    return path


@main.command()
@click.argument("model", type=click.Path(exists=True))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Folder for the overlays (one per image, named after it), predictions.csv and predictions.json.")
@click.option("--threshold", type=float, default=None,
              help="Decision threshold (score >= T is FAIL). Default: the one chosen at training (model.json).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--quiet", is_flag=True, help="No line per image.")
@threads_option
def predict(model, images, out_dir, threshold, batch_size, quiet, threads):
    """Judge IMAGES (files, or folders searched recursively) with MODEL: a bundle folder or one of its ONNX
    files (onnxruntime, no PyTorch), or a .engine file (TensorRT on its GPU).

    \b
    Example:
      memseg-edge predict bundles/bottle ROOT/bottle/test/broken_large photo.png --out predictions/

    Per image: the score (mean of the top-100 anomaly-map pixels), PASS or FAIL at the threshold, and an
    overlay OUT/<image name>.jpg, computed by the same code as `memseg-edge run`. A file that cannot be read
    is an ERROR row, and the command then exits 1 after writing everything else.
    """
    from .predict import predict as run_predict

    path = Path(model)
    if path.suffix == ".pt" or (path.is_dir() and (path / "checkpoint.pt").is_file()
                                and not (path / "model.json").is_file()):
        raise click.ClickException(f"{model} is a checkpoint: predict runs exported models; export it first "
                                   f"(memseg-edge export {model} --out BUNDLE) and pass BUNDLE")

    def show(row):
        if not quiet:
            score = "-" if row.score is None else f"{row.score:.4f}"
            click.echo(f"{row.verdict:5s} {score:>8s}  {row.image}" + (f"  ({row.error})" if row.error else ""))

    try:
        report = run_predict(model, images, out_dir, threshold=threshold, batch_size=batch_size, threads=threads,
                             on_result=show, log=click.echo)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    c = report["counts"]
    click.echo(f"{report['images']} images in {report['seconds']:.1f} s: {c['FAIL']} FAIL, {c['PASS']} PASS, "
               f"{c['ERROR']} ERROR at threshold {report['threshold']:.6g}; overlays, predictions.csv and "
               f"predictions.json in {out_dir}")
    if c["ERROR"]:
        raise click.ClickException(f"{c['ERROR']} image(s) could not be judged: see the error column of "
                                   f"{Path(out_dir) / 'predictions.csv'}")


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
    try:
        images = list(load_images([ds.train_good[i] for i in sorted(picks)], image_size))
    except ValueError as exc:   # a corrupt or truncated file among the good images
        raise click.ClickException(f"{exc}; remove or replace that file (train would stop on it too), then run "
                                   "synth-preview again") from None
    grid = preview_grid(images, AnomalySynthesizer(cfg.synthesis), rng)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out_file), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
        raise click.ClickException(f"could not write {out_file} (use a .png name)")
    click.echo(f"foreground: {fg}")
    click.echo(f"wrote {out_file} ({len(images)} samples)")


# The line-side commands (run, camera, plc-listen, demo) live in their own module.
from .runtime_cli import register as _register_runtime_commands  # noqa: E402

_register_runtime_commands(main)
from .plant_cli import register as _register_plant_commands  # noqa: E402  (plc-gateway, opcua-cert, hmi)
_register_plant_commands(main)

if __name__ == "__main__":
    sys.exit(main())
