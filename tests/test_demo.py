"""`make demo`'s driver (ltserve.demo) on the tiny recipe: the heads table, the exported best head, a real
`bentoml serve` answering the printed curl command, and SIGTERM stopping the server with the demo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ltserve.package import load_package
from ltserve.serve.process import free_port

REPO = Path(__file__).resolve().parents[1]


def test_demo_trains_rebalances_exports_and_serves(tmp_path):
    port = free_port()
    run, model = tmp_path / "demo", tmp_path / "demo-model"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LTSERVE_")}
    env["BENTOML_HOME"] = str(tmp_path / "bentoml")
    cmd = [sys.executable, "-m", "ltserve.demo", "--config", "configs/tiny.yaml", "--set", "train.epochs=3",
           "--run", str(run), "--model", str(model), "--port", str(port)]
    # SIGINT/SIGTERM at their defaults, as in a terminal (a runner started in the background has SIGINT ignored)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode(errors="replace")
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if line.startswith("which answers:"):
                lines.append(proc.stdout.readline().decode())
                break
        out = "".join(lines)
        assert "which answers:" in out, out[-3000:]
        # output is a pipe, not a terminal: one line per epoch instead of a progress bar
        assert [int(m) for m in re.findall(r"epoch (\d+)/3: loss", out)] == [1, 2, 3], out[-3000:]
        assert "\r" not in out and "step/s" not in out, "a progress bar was drawn into a pipe"

        # the heads table, every head of the run
        for head in ("joint", "crt", "tau_norm", "lws", "ncm", "la", "tau_norm+la", "lws+la"):
            assert re.search(rf"^\| {re.escape(head)} \|", out, re.M), f"{head} missing from the table:\n{out}"
        best = re.search(r"best head by val accuracy: (\S+)", out).group(1)
        assert load_package(model).head.name == best

        # the printed curl command works, and answers what the demo printed
        curl = re.search(r"curl -s -F image=@(\S+) (http://\S+)", out)
        answer = subprocess.run(["curl", "-s", "-F", f"image=@{curl.group(1)}", curl.group(2)], capture_output=True,
                                text=True, timeout=30)
        assert json.loads(answer.stdout) == json.loads(lines[-1])
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)  # the demo stops its server on the way out
        proc.wait(60)
    # its workers leave a moment after their supervisor (sooner on an idle machine): wait for the port to close
    deadline = time.monotonic() + 15
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/livez", timeout=2)
            still_up = True
        except httpx.HTTPError:
            still_up = False
        if not still_up or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not still_up, "the demo's server outlived the demo by 15 s"


def test_demo_resumes_the_existing_run_and_fresh_starts_over(tmp_path, capsys):
    """Without --fresh an existing run is resumed (an interrupted stage 1 continues from its checkpoint, a finished one
    is not trained again) and stage 2, evaluation and export run again; --fresh deletes the run first."""
    from ltserve.config import load_config
    from ltserve.demo import main
    from ltserve.fileio import sha256_file
    from ltserve.rundir import read_run
    from ltserve.train import train

    run, model = tmp_path / "demo", tmp_path / "demo-model"
    overrides = ["train.epochs=2", "data.longtail.n_max=100", "data.longtail.val_per_class=5",
                 "data.max_test_images=100"]
    argv = ["--config", str(REPO / "configs" / "tiny.yaml"), *[a for o in overrides for a in ("--set", o)],
            "--run", str(run), "--model", str(model), "--no-serve"]
    train(load_config(REPO / "configs" / "tiny.yaml", overrides), run, stop_after_epochs=1, evaluate=False)
    created = read_run(run).created
    (run / "note.txt").write_text("the user's file in the run folder")

    def checkpoint() -> dict[str, tuple[str, int]]:
        return {p.name: (sha256_file(p), p.stat().st_mtime_ns) for p in sorted((run / "checkpoint").iterdir())}

    assert main(argv) == 0  # stage 1 continues from epoch 1
    info = read_run(run)
    assert info.finished and info.epochs_done == 2 and info.created == created
    assert [e["epoch"] for e in info.train_metrics["epochs"]] == [1, 2]
    assert "resuming" in capsys.readouterr().out
    before, package_stamp = checkpoint(), (model / "model.json").stat().st_mtime_ns
    assert list(before) == ["epoch-0002.json", "epoch-0002.safetensors"]

    assert main(argv) == 0  # finished: reused, not trained again; stage 2 and export run again
    assert read_run(run).created == created and checkpoint() == before
    assert (model / "model.json").stat().st_mtime_ns != package_stamp
    assert (run / "note.txt").is_file()
    capsys.readouterr()
    assert main([*argv, "--set", "train.lr=0.05"]) == 2  # another recipe cannot resume this run
    assert "train.lr" in (err := capsys.readouterr().err) and "--fresh" in err and checkpoint() == before

    assert main([*argv, "--fresh"]) == 0  # deleted first, trained again from scratch
    assert not (run / "note.txt").exists()
    after = checkpoint()
    assert list(after) == list(before) and all(after[k][1] != before[k][1] for k in after)
    assert read_run(run).finished
