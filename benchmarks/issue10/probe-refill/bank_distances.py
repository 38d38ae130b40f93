import sys, torch, numpy as np
from memseg_edge.train.checkpoint import load_model
from memseg_edge.train.config import MemSegConfig
from memseg_edge.train.datasets import discover, run_split, load_images
from memseg_edge.train.trainer import memory_features
torch.set_num_threads(2)
for run in sys.argv[1:]:
    model, ck = load_model(run + "/checkpoint.pt"); model.eval()
    cfg = MemSegConfig.from_dict(ck["config"])
    split = run_split(cfg, discover(cfg.data).train_good)
    imgs = load_images(split.holdout, cfg.data.image_size, cfg.data.resize)
    with torch.no_grad():
        feats = memory_features(model, imgs, "cpu")
        diffs, _ = model.memory(feats)
    out = []
    for d, s in zip(diffs, model.memory.scales()):
        raw = d.mean(1)  # per position mean squared diff
        out.append(f"raw {float(raw.mean()):.4g} p99 {float(raw.flatten().quantile(0.99)):.4g} scale {float(s):.4g} norm {float((raw/s).mean()):.3f}")
    print(run, " | ".join(out))
