"""`ltserve predict`: offline batch prediction over folders, globs and list files, on one machine or a Ray cluster.

    run_predict(PredictOptions(inputs, model, out, ...)) -> summary     (the CLI: ltserve.cli.predict)

    inputs.py      folders (recursive), globs, single images and list files -> items
    decode.py      decode worker processes (spawn-safe), a bounded number of chunks in flight
    sinks.py       append-only, resumable JSONL / CSV / Parquet-folder writers
    output.py      the job's writers, tally and row shapes
    local.py       the local engine: decode workers feed fixed-size batches to one Predictor
    ray_engine.py  the Ray Data engine (`--engine ray`): decode tasks and Predictor actors on a cluster
    options.py     PredictOptions, checked before any work

Rows: the Predictor's `Prediction` (label, class_index, probability, shot_group, top_k) plus `path` (as the input
named it) and, when a list file gives a label, `true_label` and `true_class_index`. Failed files go to the errors
file (default `<out>.errors.jsonl`) as `{"path", "error", "reason"}`; the run carries on. `--resume` skips the paths
already in the output or the errors file; a label in a list makes the summary report top-1 and Many/Medium/Few.
"""
