"""The local engine: spawned decode worker processes feed fixed-size batches to one Predictor in this process."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ltserve.batch.adapt import TransductiveAdapter
from ltserve.batch.decode import DecodePool
from ltserve.batch.inputs import Item
from ltserve.batch.options import PredictOptions, default_workers
from ltserve.batch.output import Output, error_row, prediction_row
from ltserve.package import ModelJson
from ltserve.runtime import Predictor


def run_local(items: Sequence[Item], opts: PredictOptions, meta: ModelJson, output: Output) -> None:
    """Decode in worker processes and predict in this one, fixed-size batches, rows written as they come (with
    --adapt-prior: once every file is predicted and the input's prior is estimated, see `TransductiveAdapter`)."""
    adapter = (TransductiveAdapter(meta, len(items), opts.out, opts.adapt_prior) if opts.adapt_prior else None)
    try:
        _run(items, opts, meta, output, adapter)
    finally:
        if adapter is not None:
            adapter.close()


def _run(items: Sequence[Item], opts: PredictOptions, meta: ModelJson, output: Output,
         adapter: TransductiveAdapter | None) -> None:
    workers = default_workers() if opts.workers is None else opts.workers
    chunk = opts.chunk_size or min(opts.batch_size, 32)
    pending_items: list[Item] = []
    pending_images: list[np.ndarray] = []
    # the workers start (and decode the first chunks) while the Predictor loads and warms up
    with DecodePool([it.file for it in items], meta.preprocess, workers, chunk, opts.max_pixels,
                    opts.storage_options) as pool:
        predictor = Predictor(opts.model, providers=opts.providers, threads=opts.threads,
                              max_batch_size=opts.batch_size, backend=opts.backend, torch_options=opts.torch_options,
                              open_set=opts.open_set)
        output.ready()

        def run_batch(n: int) -> None:
            batch_items, batch_images = pending_items[:n], pending_images[:n]
            del pending_items[:n], pending_images[:n]
            logits, features = predictor.predict_outputs(predictor.preprocess(batch_images))
            if adapter is not None:  # rows are written once the whole input's prior is known
                adapter.keep(batch_items, logits)
                return
            preds = predictor.postprocess(logits, opts.top_k, features=features)
            output.rows([prediction_row(it, p.model_dump(mode="json"), predictor.labels)
                         for it, p in zip(batch_items, preds)])

        for decoded in pool:
            if decoded.failures:
                output.errors([error_row(items[i], kind, reason) for i, kind, reason in decoded.failures])
            pending_items.extend(items[i] for i in decoded.ok)
            pending_images.extend(decoded.images)
            while len(pending_items) >= opts.batch_size:
                run_batch(opts.batch_size)
            output.flush(len(decoded.ok) + len(decoded.failures))
    if pending_items:
        run_batch(len(pending_items))
        output.flush(0)
    if adapter is not None:
        output.prior = adapter.finish(predictor, opts.top_k, opts.batch_size, output)

