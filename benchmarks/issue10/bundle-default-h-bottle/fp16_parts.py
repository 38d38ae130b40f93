"""FP16 against FP32 maps of a bundle, with parts of the network kept in float32 (BENCHMARKS.md, H downstream).
Usage: python fp16_parts.py BUNDLE_DIR (bottle test images, every 4th, 24)."""
import sys, shutil, glob, numpy as np, cv2
from pathlib import Path
from memseg_edge.backends import OnnxRuntimeBackend
from memseg_edge.calibration.fp16 import convert_fp16
src = Path(sys.argv[1]); work = Path("/tmp/fp16b"); shutil.rmtree(work, ignore_errors=True); shutil.copytree(src, work, ignore=shutil.ignore_patterns("engines", "*.int8.onnx"))
files = sorted(glob.glob("/work/shared/data/mvtec_ad/bottle/test/*/*.png"))[::4][:24]
imgs = np.stack([cv2.resize(cv2.imread(f)[:, :, ::-1], (256, 256), interpolation=cv2.INTER_AREA) for f in files])
ref, _ = OnnxRuntimeBackend(work / "model.onnx").infer(imgs)
def report(name, path):
    m, _ = OnnxRuntimeBackend(path).infer(imgs); d = np.abs(m - ref)
    print(f"{name}: max {d.max():.3f} mean {d.mean():.2e} moved>0.02 {(d > 0.02).mean():.2e}")
report("fp16 default", work / "model.fp16.onnx")
for keep in (["/model/decoder/final_up", "/model/decoder/head"], ["/model/decoder/"], ["/model/fusion/"],
             ["/model/encoder/"], ["/model/encoder/", "/model/fusion/"]):
    p = convert_fp16(work, keep_fp32=keep, log=lambda *a: None); report(f"fp16 keep {keep}", p)
