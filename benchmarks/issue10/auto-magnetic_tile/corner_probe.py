"""Scratch: a 'broken corner' probe on held-out good tiles (no test image): a corner triangle of 10-25 % of the
tile replaced by dark background. Does per-image standardisation (N) lose here, as on the real test set?"""
import sys, numpy as np, torch
sys.path.insert(0, "tools")
from memseg_edge.train.trainer import load_run, predict_maps
from memseg_edge.train.datasets import load_images
from memseg_edge.train import metrics
from memseg_edge.scoring import image_scores
torch.set_num_threads(2)
rng = np.random.default_rng(0)
def corners(imgs):
    out, masks = [], []
    n, h, w, _ = imgs.shape
    yy, xx = np.mgrid[0:h, 0:w]
    for img in imgs:
        a = rng.uniform(0.10, 0.25) * 2 * h * w    # triangle area = leg^2/2
        leg = np.sqrt(a)
        c = rng.integers(4)
        u = xx if c in (0, 2) else w - 1 - xx
        v = yy if c in (0, 1) else h - 1 - yy
        m = (u + v) < leg
        x = img.copy(); x[m] = rng.integers(5, 30)
        out.append(x); masks.append(m.astype(np.uint8))
    return np.stack(out), np.stack(masks)
res = {}
for run in sys.argv[1:]:
    model, ckpt, cfg, split = load_run(run, "../shared/data", "magnetic_tile")
    good = load_images(split.holdout, 256, cfg.data.resize)
    bad, m = corners(good)
    imgs = np.concatenate([good, bad]); masks = np.concatenate([np.zeros_like(m), m])
    labels = np.r_[np.zeros(len(good)), np.ones(len(bad))]
    maps = predict_maps(model, imgs, "cpu")
    r = metrics.evaluate_maps(maps, masks, image_scores(maps, int(ckpt["top_k"])), labels, ["good"] * len(good) + ["corner"] * len(bad))
    print(f"{run} std={cfg.model.standardise_images}: image {r['image_auroc']:.4f} pixel {r['pixel_auroc']:.4f} aupro {r['aupro']:.4f}", flush=True)
