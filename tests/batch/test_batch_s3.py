"""`ltserve predict s3://... --out s3://...`: object storage in and out, on a local S3 server (moto's server mode on
127.0.0.1), for the local and the Ray engine, with the errors folder, a SIGKILL and `--resume`.

The CLI runs as a subprocess that finds the credentials and the endpoint where any S3 client does: the variables
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL. The secret must never appear in its output.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ltserve.batch.storage import PartsSink, is_url, parse_storage_options
from ltserve.errors import ConfigError
from package_helpers import build_lsq_package, read_fashion

pytest.importorskip("s3fs")
pytest.importorskip("moto")

REPO = Path(__file__).resolve().parents[2]
SECRET = "ltserve-test-secret-9f3c"  # any value works with moto; the test checks it is never printed
BUCKET = "ltserve-batch"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 and a file system on it: {"fs", "env"} (env: what the CLI is given)."""
    from moto.server import ThreadedMotoServer
    import s3fs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "ltserve-test-key", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=SECRET, endpoint_url=env["AWS_ENDPOINT_URL"],
                           skip_instance_cache=True)
    fs.mkdir(BUCKET)
    try:
        yield {"fs": fs, "env": env}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return build_lsq_package(tmp_path_factory.mktemp("models") / "fashion-lsq", n_train=3000)


@pytest.fixture(scope="module")
def uploaded(s3) -> dict:
    """Fashion-MNIST test PNGs under two prefixes (60 with a nested folder; 240 for the kill), plus one corrupt
    file in each: {"small": [urls], "big": [urls], "images": {url: uint8 array}}."""
    fs = s3["fs"]
    images, _ = read_fashion("t10k")
    out: dict = {"small": [], "big": [], "images": {}}
    for name, n, start in (("small", 60, 0), ("big", 240, 100)):
        for i in range(n):
            key = f"{BUCKET}/{name}/{'sub/' if name == 'small' and i % 3 == 0 else ''}{i:04d}.png"
            buf = io.BytesIO()
            Image.fromarray(images[start + i]).save(buf, format="PNG")
            fs.pipe_file(key, buf.getvalue())
            out[name].append(f"s3://{key}")
            out["images"][f"s3://{key}"] = images[start + i]
        fs.pipe_file(f"{BUCKET}/{name}/corrupt.png", b"\x89PNG\r\n\x1a\n not really a png")
        fs.pipe_file(f"{BUCKET}/{name}/.hidden.png", b"skipped, as hidden local files are")
    return out


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "ltserve.cli", "predict", *map(str, args), "--no-progress"]


def run_cli(s3, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cli(*args), cwd=REPO, env={**os.environ, **s3["env"]}, capture_output=True,
                          text=True, timeout=timeout)
    assert SECRET not in proc.stdout + proc.stderr, "the secret key was printed"
    return proc


def read_parts(fs, url: str) -> list[dict]:
    rows = []
    for part in sorted(fs.glob(url.replace("s3://", "").rstrip("/") + "/part-*")):
        data = fs.cat_file(part)
        if part.endswith(".parquet"):
            import pyarrow.parquet as pq

            rows += pq.read_table(io.BytesIO(data)).to_pylist()
        else:
            rows += [json.loads(line) for line in data.splitlines() if line.strip()]
    return rows


def check_rows(rows: list[dict], expected: list[str], images: dict, package: Path) -> None:
    """Every image answered exactly once, with the Predictor's own answer."""
    from ltserve.runtime import Predictor

    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "a file was answered twice"
    assert sorted(paths) == sorted(expected), "files lost or foreign rows"
    predictor = Predictor(package, threads=1)
    logits = predictor.predict(predictor.preprocess([images[p][..., None] for p in paths]))
    assert [r["class_index"] for r in rows] == logits.argmax(1).tolist()


def test_predict_from_s3_to_s3_answers_every_image_once_and_lists_the_bad_file(s3, uploaded, package):
    out = f"s3://{BUCKET}/out-local/"
    proc = run_cli(s3, package, f"s3://{BUCKET}/small/", "--out", out, "--workers", 1,
                   "--batch-size", 16, "--part-rows", 25)
    assert proc.returncode == 1, proc.stderr[-3000:]  # one file failed
    assert "61 files: 60 predicted, 1 failed" in proc.stdout
    rows = read_parts(s3["fs"], out)
    check_rows(rows, uploaded["small"], uploaded["images"], package)
    assert len(s3["fs"].glob(f"{BUCKET}/out-local/part-*.jsonl")) == 3  # 25 + 25 + 10 rows
    errors = read_parts(s3["fs"], f"s3://{BUCKET}/out-local.errors.jsonl/")
    assert [(e["path"], e["error"]) for e in errors] == [(f"s3://{BUCKET}/small/corrupt.png", "InvalidImage")]
    # the same output again needs --resume or --overwrite; --resume then has nothing to do
    again = run_cli(s3, package, f"s3://{BUCKET}/small/", "--out", out, "--workers", 0)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run_cli(s3, package, f"s3://{BUCKET}/small/", "--out", out, "--workers", 0, "--resume")
    assert resumed.returncode == 1 and "61 files: 60 predicted, 1 failed (61 done by an earlier run)" in resumed.stdout


def test_sigkill_midway_then_resume_on_s3_loses_and_repeats_nothing(s3, uploaded, package, tmp_path):
    out = f"s3://{BUCKET}/out-killed/"
    common = [package, f"s3://{BUCKET}/big/", "--out", out, "--workers", 1, "--batch-size", 8,
              "--part-rows", 8]
    proc = subprocess.Popen(_cli(*common), cwd=REPO, env={**os.environ, **s3["env"]}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    fs = s3["fs"]
    deadline = time.monotonic() + 120
    parts = []
    while time.monotonic() < deadline and proc.poll() is None:
        fs.invalidate_cache()
        parts = fs.glob(f"{BUCKET}/out-killed/part-*.jsonl")
        if len(parts) >= 3:  # some parts committed, most of the input still to go
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its decode worker, mid-run
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    fs.invalidate_cache()
    done_at_kill = len(read_parts(fs, out))
    assert 0 < done_at_kill < 240, "the run was not stopped midway"

    summary = tmp_path / "summary.json"
    resumed = run_cli(s3, *common, "--resume", "--json", summary)
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    fs.invalidate_cache()
    rows = read_parts(fs, out)
    check_rows(rows, uploaded["big"], uploaded["images"], package)  # 0 lost, 0 duplicated
    errors = read_parts(fs, f"s3://{BUCKET}/out-killed.errors.jsonl/")
    assert [e["path"] for e in errors] == [f"s3://{BUCKET}/big/corrupt.png"]
    s = json.loads(summary.read_text())
    assert s["predicted"] == 240 and s["failed"] == 1
    assert s["resumed"] >= done_at_kill and s["resumed"] + s["new_rows"] + s["new_errors"] == 241


def test_ray_engine_reads_s3_and_writes_parquet_parts(s3, uploaded, package):
    pytest.importorskip("ray")
    out = f"s3://{BUCKET}/out-ray.parquet/"
    proc = run_cli(s3, package, f"s3://{BUCKET}/small/", "--out", out, "--engine", "ray",
                   "--ray-num-cpus", 2, "--workers", 1, "--concurrency", 1, "--batch-size", 16,
                   "--storage-option", f"endpoint_url={s3['env']['AWS_ENDPOINT_URL']}", timeout=400)
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = read_parts(s3["fs"], out)
    check_rows(rows, uploaded["small"], uploaded["images"], package)
    errors = read_parts(s3["fs"], f"s3://{BUCKET}/out-ray.parquet.errors.jsonl/")
    assert [e["path"] for e in errors] == [f"s3://{BUCKET}/small/corrupt.png"]


def test_missing_prefix_and_bad_options_fail_fast_without_the_secret(s3, package):
    proc = run_cli(s3, package, f"s3://{BUCKET}/no-such-prefix/", "--out", f"s3://{BUCKET}/o/")
    assert proc.returncode == 2 and "no such object or prefix" in proc.stderr
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_storage_options([f"secret{SECRET}"])
    assert parse_storage_options(["anon=true", "endpoint_url=http://h:1", "n=3"]) == {
        "anon": True, "endpoint_url": "http://h:1", "n": 3}
    assert is_url("s3://b/k") and not is_url("/tmp/x") and not is_url("file:///tmp/x") and not is_url("rel/x.png")


def test_parts_sink_commits_whole_parts_and_recovers_them(s3):
    url = f"s3://{BUCKET}/sink-test/"
    opts = {"key": s3["env"]["AWS_ACCESS_KEY_ID"], "secret": SECRET, "endpoint_url": s3["env"]["AWS_ENDPOINT_URL"]}
    row = {"label": "a", "class_index": 0, "probability": 0.5, "shot_group": "many", "top_k": []}
    for fmt in ("jsonl", "csv", "parquet"):
        sink = PartsSink(url + fmt, fmt, labelled=False, part_rows=3, options=opts)
        sink.start(append=False)
        sink.write([{**row, "path": f"p{i}"} for i in range(7)])  # two whole parts; one row buffered
        recovered = PartsSink(url + fmt, fmt, labelled=False, part_rows=3, options=opts)
        assert [r["path"] for r in recovered.recover()] == [f"p{i}" for i in range(6)]
        sink.close()
        assert [r["path"] for r in recovered.recover()] == [f"p{i}" for i in range(7)]
        assert [r["class_index"] for r in recovered.recover()] == [0] * 7
