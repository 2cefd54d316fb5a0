"""Export a checkpoint for deployment:
python tools/export_model.py --config CFG --model_path CKPT --save_dir DIR [-o key=value]

Writes one folder per exported graph, each with model.json, model.pdiparams and deploy.yaml: for
KDAD DIR/score, DIR/heatmap and DIR/feature_map; for the other methods DIR/anomaly_map (the whole
scorer: image in, score and blurred anomaly map out). Everything (networks, input size, data)
comes from the checkpoint; --config is only compared with it (another method or backbone is an
error, other differences are reported); -o / --dataset_root / --normal_class may change the
non-network keys (e.g. dataset_root, used for the feature-map statistics).
"""

import os
import sys
from typing import List

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from kdad.cli import base_parser, config_from_args, run_main  # noqa: E402


def main(argv: List[str]) -> int:
    parser = base_parser("Export a checkpoint to Paddle Inference models with deploy.yaml files.")
    for action in parser._actions:
        if action.dest == "save_dir":
            action.help = "output folder for the exported model folders (required)"
    parser.add_argument("--model_path", required=True, help="checkpoint (model_final.pdparams)")
    parser.add_argument("--kinds", default=None,
                        help="comma-separated models to export: KDAD score, heatmap, feature_map (default: "
                             "all three); other methods anomaly_map (the default)")
    parser.add_argument("--heatmap_backward", default="explicit", choices=("explicit", "autograd"),
                        help="heatmap graph: hand-written backward with forward ops (converts to ONNX; "
                             "default) or paddle.grad inside the graph (oneDNN off, no ONNX)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the exported models already in --save_dir (all kinds; without it an "
                             "existing export is an error)")
    args = parser.parse_args(argv)
    if not args.save_dir:
        parser.error("--save_dir is required")
    from kdad.config import parse_overrides
    from kdad.export import export_model

    requested = config_from_args(args)  # validates --config and -o
    overrides = parse_overrides(args.override)  # only explicit values replace the checkpoint's
    for key in ("dataset_root", "normal_class"):
        if getattr(args, key):
            overrides[key] = getattr(args, key)
    written = export_model(args.model_path, args.save_dir, overrides,
                           expected_config=requested if args.config else None,
                           kinds=[k.strip() for k in (args.kinds or "").split(",") if k.strip()] or None,
                           heatmap_backward=args.heatmap_backward, overwrite=args.overwrite)
    for kind, folder in written.items():
        print(f"{kind}: {folder}")
    return 0


if __name__ == "__main__":
    run_main(main)
