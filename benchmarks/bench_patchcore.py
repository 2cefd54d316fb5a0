"""PatchCore fit time and coreset quality on Magnetic Tile (issue 10's performance targets).

1. Fit at 256 px on the 762 training images with the default backbone (EfficientNet-Lite0, ImageNet
   weights) and the default (``fast``) coreset, through :func:`fit_patchcore`: seconds for the features
   and for the coreset (target: both within 5 minutes on 2 cores).
2. At 128 px: the features once, then the ``exact`` and ``fast`` coresets (optionally the ``bruteforce``
   reference loop) of the same embedding, each scored on the test split: image AUROC (target: fast
   within 0.01 of exact), seconds, and optionally the covering radius (the k-center objective).

Usage: ``python benchmarks/bench_patchcore.py [--data ROOT] [--bruteforce] [--radius] [--json FILE]``.
Skips (exit 0) when the data set is absent.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Optional

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.common import load_average, log, peak_rss_mb, write_json  # noqa: E402

DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "magnetic_tile")
CATEGORY = "magnetic_tile"


def make_config(size: int, **overrides: Any) -> Dict[str, Any]:
    from kdad.config import default_config

    config = default_config()
    config.update(method="patchcore", backbone="efficientnet_lite0", backbone_pretrained=True,
                  mvtec_img_size=size, coreset_ratio=0.1, num_neighbors=9, seed=42)
    config.update(overrides)
    return config


def load_images(root: str, split: str, size: int):
    from kdad.data import AnomalyDataset, list_mvtec

    dataset = AnomalyDataset(list_mvtec(root, CATEGORY, split), size)
    return dataset.images(), dataset.labels


def score_with_bank(model, embedding, bank, batch: int = 32):
    """Image scores of test embeddings ``[N, D, h, w]`` against ``bank`` (the model's own scoring)."""
    import numpy as np
    import paddle

    model.set_memory_bank(bank)
    scores = []
    with paddle.no_grad():
        for lo in range(0, embedding.shape[0], batch):
            out = model.score_embedding(paddle.to_tensor(embedding[lo:lo + batch]))
            scores.append(out["scores"].numpy())
    return np.concatenate(scores)


def fit_256(root: str) -> Dict[str, Any]:
    from kdad.methods.patchcore import build_model, fit_patchcore

    images, _ = load_images(root, "train", 256)
    config = make_config(256)
    model = build_model(config)
    start = time.perf_counter()
    facts = fit_patchcore(model, images, config, log=log)
    total = time.perf_counter() - start
    return {"size": 256, "images": int(images.shape[0]), "features_s": facts["features_s"],
            "coreset_s": facts["coreset_s"], "total_s": round(total, 1), "patches": facts["patches"],
            "bank_size": facts["bank_size"], "method": facts["coreset_method"], "cells": facts["cells"],
            "projection_dim": facts["projection_dim"], "load_avg_after": load_average()}


def coresets_128(root: str, methods: List[str], radius: bool) -> List[Dict[str, Any]]:
    from kdad.methods.patchcore import build_model
    from kdad.methods.patchcore.coreset import covering_radius, select_coreset
    from kdad.methods.patchcore.fit import patch_embeddings
    from kdad.metrics import image_auroc

    config = make_config(128)
    model = build_model(config)
    train, _ = load_images(root, "train", 128)
    test, labels = load_images(root, "test", 128)
    t0 = time.perf_counter()
    embedding = patch_embeddings(model, train, batch_size=32, engine="paddle_inference")
    features_s = time.perf_counter() - t0
    grid = 128 // model.feature_stride
    test_rows = patch_embeddings(model, test, batch_size=32, engine="paddle_inference")
    test_emb = test_rows.reshape(test.shape[0], grid, grid, -1).transpose(0, 3, 1, 2)
    log(f"128 px: {embedding.shape[0]} training patches ({features_s:.1f} s), {test.shape[0]} test images")
    rows = []
    for method in methods:
        log(f"128 px: {method} coreset ...")
        idx, info = select_coreset(embedding, config["coreset_ratio"], config["seed"], method=method, log=log)
        t1 = time.perf_counter()
        scores = score_with_bank(model, test_emb, embedding[idx])
        row = {"size": 128, "method": method, "features_s": round(features_s, 1),
               "coreset_s": round(info["projection_s"] + info["greedy_s"], 1), "cells": info["cells"],
               "projection_dim": info["projection_dim"], "bank_size": info["bank_size"],
               "auroc": round(float(image_auroc(labels, scores)), 4), "score_s": round(time.perf_counter() - t1, 1),
               "load_avg_after": load_average()}
        if radius:
            row["covering_radius"] = round(covering_radius(embedding, idx), 3)
        rows.append(row)
        log(f"128 px: {row}")
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="folder holding magnetic_tile/ (MVTec layout)")
    parser.add_argument("--bruteforce", action="store_true", help="also run the reference loop at 128 px (slow)")
    parser.add_argument("--radius", action="store_true", help="covering radius of each 128 px coreset (1-2 min each)")
    parser.add_argument("--skip_256", action="store_true", help="only the 128 px comparison")
    parser.add_argument("--json", default="", help="write the results to this file")
    args = parser.parse_args(argv)
    train_dir = os.path.join(args.data, CATEGORY, "train", "good")
    if not os.path.isdir(train_dir):
        print(f"SKIP: Magnetic Tile not found at {os.path.normpath(train_dir)}")
        return 0
    import kdad  # noqa: F401  (CPU environment before paddle)

    log(f"load average before: {load_average()}")
    result: Dict[str, Any] = {"load_avg_before": load_average()}
    if not args.skip_256:
        result["fit_256"] = fit_256(args.data)
        log(f"256 px fit: {result['fit_256']}")
    methods = ["exact", "fast"] + (["bruteforce"] if args.bruteforce else [])
    result["coresets_128"] = coresets_128(args.data, methods, args.radius)
    result["peak_rss_mb"] = round(peak_rss_mb(), 0)

    print("\nPatchCore on Magnetic Tile (EfficientNet-Lite0, ImageNet weights, coreset ratio 0.1)")
    if "fit_256" in result:
        f = result["fit_256"]
        print(f"fit 256 px, {f['images']} images, {f['patches']} patches -> bank {f['bank_size']} "
              f"({f['method']}, {f['cells']} cells): features {f['features_s']:.1f} s, coreset {f['coreset_s']:.1f} s, "
              f"total {f['total_s']:.1f} s")
    print("| 128 px coreset | seconds | bank | projection dim | cells | image AUROC | covering radius |")
    print("|---|---|---|---|---|---|---|")
    for r in result["coresets_128"]:
        print(f"| {r['method']} | {r['coreset_s']:.1f} | {r['bank_size']} | {r['projection_dim']} | {r['cells']} | "
              f"{r['auroc']:.4f} | {r.get('covering_radius', '-')} |")
    by_method = {r["method"]: r for r in result["coresets_128"]}
    gap = abs(by_method["fast"]["auroc"] - by_method["exact"]["auroc"])
    print(f"AUROC gap fast vs exact: {gap:.4f} (target <= 0.01); load average before {result['load_avg_before']}, "
          f"after {load_average()}; peak RSS {result['peak_rss_mb']:.0f} MB")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
