"""Fold a head into one Gemm and export a verified model package: `model.onnx` (+ `model.pt2`) and `model.json`.

    export_package(run, head, out_dir, precision="fp32" | "fp16" | "int8", jpeg_draft="auto" | "on" | "off")
        (`ltserve export runs/NAME --head HEAD --out models/NAME [--precision int8] [--jpeg-draft auto]`)

    build.py      export_package: the steps in order, built in a temporary folder and moved into place
    describe.py   model.json: the head's parameters (its registry entry's `params`), metrics, label-shift inputs
    fold.py       the exported module: backbone -> (ncm: centring + L2) -> one Gemm holding (W / T, b / T)
    graph.py      torch.export -> ONNX (symbolic batch), the head sub-graph check, fp16 conversion
    quantize.py   int8: class-balanced calibration on training images, static QDQ quantisation, the int8 head
                  check, sensitivity ranking and retries
    reference.py  verification images (the run's test split) and the unfolded head's logits (the registry)
    verify.py     ONNX Runtime vs unfolded (fp32), fp16 / int8 vs fp32 per shot group (one comparison), pt2 vs ONNX
    open_set.py   open-set rejection: the graph's `features` output checked, feature statistics (into model.onnx's
                  metadata), the score chosen and its thresholds calibrated per shot group on val (`ltserve.open_set`)
    draft.py      JPEG draft decoding: the shipped graph on the verification split decoded exactly and with draft,
                  per shot group (the same comparison); on, off or refused, and why

Every folded head therefore has exactly the node count of the joint export; ncm adds its four normalisation nodes
(Sub, ReduceL2, Clip, Div). The penultimate features (the tensor the head reads) are a second graph output,
`features`, which adds no node; their class statistics go into model.onnx's metadata and the calibrated open-set
score and thresholds into model.json's `open_set` section. Verification is part of export and a package that fails
it is never written (it is built in a temporary folder beside the target and moved into place at the end).
`model.json` records the head's parameters (what its registry entry's `params` names), its val and test metrics
(test computed from the cached features when no evaluation recorded it), the verification (with the `warnings` of
the method's own check, `HeadMethod.check`: e.g. tiny lws scales; non-positive ones refuse the export), provenance,
and the head's val confusion matrix (`label_shift`: what black-box label-shift estimation needs,
`ltserve.runtime.prior`). This file only names the public interface; the code is in the modules above.
"""

from ltserve.export.build import FORMATS, INT8_VERIFY_IMAGES, PRECISIONS, export_package, parse_formats
from ltserve.export.describe import head_metrics, head_params, label_shift_info
from ltserve.export.draft import JPEG_DRAFT_MODES, JpegDraftOptions
from ltserve.export.quantize import DEFAULT_KEEP_FLOAT, Int8Options
from ltserve.export.verify import VERIFY_IMAGES

__all__ = ["DEFAULT_KEEP_FLOAT", "FORMATS", "INT8_VERIFY_IMAGES", "Int8Options", "JPEG_DRAFT_MODES", "JpegDraftOptions",
           "PRECISIONS", "VERIFY_IMAGES", "export_package", "head_metrics", "head_params", "label_shift_info",
           "parse_formats"]
