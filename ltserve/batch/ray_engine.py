"""`ltserve predict --engine ray`: the batch job as Ray Data stages, on a local Ray instance or a cluster.

    items -> from_items(idx, file) -> map_batches(decode_batch)   CPU tasks: read + `decode`, bad files marked
                                   -> map_batches(RayPredictor)   actors, one Predictor each (concurrency, num_gpus,
                                                                  --backend and the torch options, as the local engine)
                                   -> iter_batches on the driver  -> the same writers, resume and summary as local

The prediction rows (a few hundred bytes each) stream back to this process and go through the local engine's
writers (`ltserve.batch.output`), so the errors file, `--resume`, the exit code and the summary are the same as with the local engine, and a
local `--out` path means this machine (Ray's own `write_parquet` would write each block on whichever node ran it).

Ray fuses a task stage into the following actor stage when their sizes and resources agree (CPU only, e.g.
`--workers` unset or equal to `--concurrency`): each actor then decodes its own batches, which keeps every core busy
when the actors fill the machine; with `--num-gpus`, or a `--workers` different from `--concurrency`, decoding stays
in separate CPU tasks that overlap inference.

`ray.init()` connects to `RAY_ADDRESS` when it is set (local files must then be readable at the same absolute paths on
every node, e.g. a shared file system, and ltserve installed there; inputs on object storage, `s3://...`, are read
by each decode task itself, with the credentials of the node or `--storage-option`; the model package goes to the
actors through Ray's object store, `ship_package`, so it need not be on the nodes); otherwise a local instance is started with
`--ray-num-cpus` CPUs and no dashboard, and shut down at the end. Ray is imported only here, lazily.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ltserve.batch.decode import DecodedChunk, decode_files
from ltserve.batch.inputs import Item
from ltserve.batch.options import PredictOptions
from ltserve.batch.output import Output, error_row, prediction_row
from ltserve.batch.storage import is_url
from ltserve import errors
from ltserve.errors import LtserveError, MissingDependency
from ltserve.package import MODEL_JSON, ModelJson
from ltserve.preprocess import DEFAULT_MAX_PIXELS, PreprocessSpec


logger = logging.getLogger(__name__)


def require_ray() -> Any:
    """Import ray and ray.data, or raise MissingDependency (an LtserveError) naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library is a separate extra of ray
    except ImportError as exc:
        raise MissingDependency(f"--engine ray needs Ray Data ({exc}): `pip install \"ltserve[ray]\"` (ray[data] and "
                         "pyarrow), or use --engine local") from None
    return ray


def decode_batch(batch: dict[str, np.ndarray], spec_json: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                 storage_options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Ray Data task: read and decode a batch of files; failures are marked, never raised.

    Args:
        batch: {"idx": (n,) int64, "file": (n,) str}.
        spec_json: the package's PreprocessSpec as JSON (a plain string ships cheaply to every task).
        storage_options: fsspec options for files named by URL (`--storage-option`).

    Returns:
        {"idx": (n,), "image": uint8 (n, crop, crop, C) (zeros for a failed file), "error": (n,) str ("" when
        decoded), "reason": (n,) str}.
    """
    spec = PreprocessSpec.model_validate_json(spec_json)
    n = len(batch["idx"])
    chunk: DecodedChunk = decode_files([str(f) for f in batch["file"]], spec, max_pixels,
                                       storage_options=storage_options)
    images = np.zeros((n, spec.crop, spec.crop, spec.channels), dtype=np.uint8)
    if chunk.ok:
        images[chunk.ok] = chunk.images
    error = np.full(n, "", dtype=object)
    reason = np.full(n, "", dtype=object)
    for i, kind, why in chunk.failures:
        error[i], reason[i] = kind, why
    return {"idx": np.asarray(batch["idx"]), "image": images, "error": error, "reason": reason}


class RayPredictor:
    """Ray Data actor: builds the Predictor once, then predicts the decoded rows of each batch.

    Args:
        model_dir: the model package: a folder the actor's node can read, or what `ship_package` put in Ray's
            object store.
        top_k, batch_size, providers, threads: as `ltserve predict`.
        backend: "onnxruntime" or "torch" (`--backend`): the same runner as the local engine's, in every actor.
        torch_options: the torch runner's device, precision, cuda_graphs, compile (`PredictOptions.torch_options`).
    """

    def __init__(self, model_dir: str, top_k: int, batch_size: int, providers: str | None = None,
                 threads: int | None = None, backend: str = "onnxruntime",
                 torch_options: dict[str, Any] | None = None, open_set: str | None = None) -> None:
        from ltserve.runtime import Predictor

        self.predictor = Predictor(local_package(model_dir), providers=providers, threads=threads, max_batch_size=batch_size,
                                   backend=backend, torch_options=torch_options, open_set=open_set)
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{"idx", "image", "error", "reason"} -> {"idx", "prediction" (JSON of a Prediction, "" if failed),
        "error", "reason"}."""
        ok = np.asarray(batch["error"]) == ""
        prediction = np.full(len(ok), "", dtype=object)
        if ok.any():
            p = self.predictor
            logits, features = p.predict_outputs(p.preprocess(list(batch["image"][ok])))
            preds = p.postprocess(logits, self.top_k, features=features)
            prediction[np.flatnonzero(ok)] = [x.model_dump_json() for x in preds]
        return {"idx": batch["idx"], "prediction": prediction, "error": batch["error"], "reason": batch["reason"]}


def ship_package(ray: Any, model_dir: str | os.PathLike, meta: ModelJson) -> dict[str, Any]:
    """The package's files (model.json and every file it lists) in Ray's object store, for `local_package`: the
    actors then need no shared file system, or the package at the same path, on their nodes.

    Returns:
        {"sha256": model.json's sha256, "files": an ObjectRef of {name: bytes}}.
    """
    root = Path(model_dir)
    files = {name: (root / name).read_bytes() for name in [MODEL_JSON, *meta.files]}
    return {"sha256": hashlib.sha256(files[MODEL_JSON]).hexdigest(), "files": ray.put(files)}


def local_package(source: str | dict[str, Any]) -> str:
    """A package folder on this node: `source` itself when it is a path, else the shipped files written once per
    node and package (`<temp dir>/ltserve-packages-<uid>/<sha256 prefix>`, reused by every actor and later run; the
    Predictor verifies every sha256 as always)."""
    if not isinstance(source, dict):
        return str(source)
    import ray

    folder = Path(tempfile.gettempdir()) / f"ltserve-packages-{os.getuid()}" / source["sha256"][:16]
    if not (folder / MODEL_JSON).is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".incoming-"))
        for name, data in ray.get(source["files"]).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        try:
            os.rename(tmp, folder)  # whole or not at all; another actor may have won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


_ACTOR_ERROR = re.compile(r"^ltserve\.errors\.(\w+): (.+)$", re.M)


def actor_error(exc: BaseException) -> LtserveError | None:
    """The ltserve error that killed a Predictor actor, re-raised here with its own class and message.

    Ray keeps only the text of an error raised while an actor is created (`ActorDiedError` holds the formatted
    traceback, not the exception), so the last `ltserve.errors.<Class>: <message>` line of that text is read back.
    A missing model.pt2 with `--backend torch`, or a bad provider, then reads as it does with the local engine.

    Returns:
        the error, or None when `exc` carries no ltserve error (a Ray or system failure: raise `exc` itself).
    """
    found = _ACTOR_ERROR.findall(str(exc))
    if not found:
        return None
    name, message = found[-1]
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, LtserveError)):
        return None
    return cls(f"{message} (in a Ray Predictor actor)")


def _init_ray(ray: Any, opts: PredictOptions) -> bool:
    """Connect to RAY_ADDRESS or start a local instance; True when this call started (and must stop) it."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=opts.ray_num_cpus, include_dashboard=False, log_to_driver=True)
    return True


def run_ray(items: Sequence[Item], opts: PredictOptions, meta: ModelJson, output: Output) -> None:
    """Predict `items` with Ray Data; rows and failures go to `output` as they arrive (in any order).

    Raises:
        MissingDependency: ray[data] is not installed.
    """
    ray = require_ray()
    started = _init_ray(ray, opts)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver's tqdm bar counts the rows that came back
        ds = ray.data.from_items([{"idx": i, "file": it.file if is_url(it.file) else os.path.abspath(it.file)}
                                  for i, it in enumerate(items)])
        # decode: CPU tasks, as many as --workers (None: as many as the cluster's free CPUs allow)
        ds = ds.map_batches(decode_batch, fn_kwargs={"spec_json": meta.preprocess.model_dump_json(),
                                                     "max_pixels": opts.max_pixels,
                                                     "storage_options": opts.storage_options},
                            batch_size=opts.chunk_size or min(opts.batch_size, 32), batch_format="numpy",
                            compute=ray.data.TaskPoolStrategy(size=opts.workers or None), num_cpus=1)
        # predict: `concurrency` actors, each building one Predictor; num_gpus per actor
        ds = ds.map_batches(RayPredictor, fn_constructor_kwargs={
            "model_dir": ship_package(ray, opts.model, meta), "top_k": opts.top_k, "batch_size": opts.batch_size,
            "providers": opts.providers, "threads": opts.threads, "backend": opts.backend,
            "torch_options": opts.torch_options, "open_set": opts.open_set},
            batch_size=opts.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=opts.concurrency), num_gpus=opts.num_gpus or None)
        output.ready()
        try:
            _collect(ds, items, meta, output)
        except Exception as exc:
            err = actor_error(exc)
            if err is None:
                raise
            raise err from exc
    finally:
        if started:
            ray.shutdown()


def _collect(ds: Any, items: Sequence[Item], meta: ModelJson, output: Output) -> None:
    """Stream the prediction rows back from the Ray dataset into the local writers."""
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        rows, failed = [], []
        for i, pred, kind, why in zip(batch["idx"], batch["prediction"], batch["error"], batch["reason"]):
            item = items[int(i)]
            if kind:
                failed.append(error_row(item, str(kind), str(why)))
            else:
                rows.append(prediction_row(item, json.loads(pred), meta.labels))
        if failed:
            output.errors(failed)
        if rows:
            output.rows(rows)
        output.flush(len(batch["idx"]))

