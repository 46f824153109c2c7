"""One CLI vocabulary (ltserve/cli): every verb in `ltserve --help`, the model package as the first positional
argument, `--json [PATH]` for reports, old spellings accepted with a notice, one meaning per exit status, `ltserve
serve MODEL_DIR` on a real `bentoml serve`, and a torch-less install told which extra to install."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from ltserve.cli import COMMANDS, main
from ltserve.cli.common import EXIT_FAILED, EXIT_USAGE
from ltserve.serve.process import free_port
from ltserve.serve.settings import ServiceSettings
from package_helpers import build_random_rgb_package

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# A torch-less install (`pip install ".[cpu]"`), made in this interpreter: a finder that refuses the training extra's
# modules before the real ones are looked up, as an environment without them would.
WITHOUT_TRAIN_EXTRA = """
import sys
class NoTrainingExtra:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm", "onnx", "onnxscript", "safetensors"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoTrainingExtra())
from ltserve.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return build_random_rgb_package(tmp_path_factory.mktemp("cli") / "rgb")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two decodable images and one file that is not an image (predict's exit status 1)."""
    folder = tmp_path_factory.mktemp("cli-images")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not an image at all")
    return folder


def test_help_lists_every_verb_and_the_exit_statuses(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("train", "rebalance", "evaluate", "export", "inspect", "predict", "serve", "bento", "data", "demo"):
        assert f"\n  {verb} " in out, verb
    assert "3 a quality gate refused" in out
    assert main(["serv"]) == EXIT_USAGE
    assert "did you mean 'serve'?" in capsys.readouterr().err


@pytest.mark.parametrize("verb", list(COMMANDS))
def test_every_verb_has_its_own_help(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    assert f"usage: ltserve {verb}" in capsys.readouterr().out


def test_usage_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse's own status
        main(["predict"])
    assert exc.value.code == EXIT_USAGE
    assert "MODEL_DIR" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == EXIT_USAGE  # an LtserveError: "error: ..." and no traceback
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}")


def test_predict_model_first_json_to_stdout_and_exit_1_on_a_bad_file(package, images, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    rc = main(["predict", str(package), str(images), "--out", str(out), "--workers", "0", "--no-progress",
               "--json", "-"])
    captured = capsys.readouterr()
    assert rc == EXIT_FAILED
    summary = json.loads(captured.out)  # stdout holds the JSON report alone
    assert summary["files"] == 3 and summary["predicted"] == 2 and summary["failed"] == 1
    assert len(out.read_text().splitlines()) == 2
    assert "deprecated" not in captured.err


def test_old_spellings_still_work_with_one_notice_each(package, images, tmp_path, capsys):
    new, old = tmp_path / "new.csv", tmp_path / "old.csv"
    assert main(["predict", str(package), str(images), "--out", str(new), "--out-format", "csv", "--workers", "0",
                 "--no-progress", "--json", str(tmp_path / "new.json")]) == EXIT_FAILED
    capsys.readouterr()
    assert main(["predict", str(images), "--model", str(package), "--out", str(old), "--format", "csv",
                 "--workers", "0", "--no-progress", "--summary-json", str(tmp_path / "old.json")]) == EXIT_FAILED
    err = capsys.readouterr().err
    for spelling, instead in [("--model", "ltserve predict MODEL_DIR INPUT"), ("--format", "use --out-format"),
                              ("--summary-json", "use --json")]:
        notices = [ln for ln in err.splitlines() if f"{spelling} is deprecated" in ln]
        assert len(notices) == 1 and instead in notices[0], err
    assert sorted(new.read_text().splitlines()) == sorted(old.read_text().splitlines())
    counts = [{k: json.loads(p.read_text())[k] for k in ("files", "predicted", "failed")}
              for p in (tmp_path / "new.json", tmp_path / "old.json")]
    assert counts[0] == counts[1] == {"files": 3, "predicted": 2, "failed": 1}


def test_inspect_json_to_stdout_to_a_file_and_in_the_old_order(package, tmp_path, capsys):
    assert main(["inspect", str(package), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "random-rgb"
    assert main(["inspect", "--json", str(package)]) == 0  # the bare flag before the folder, as before
    assert json.loads(capsys.readouterr().out)["name"] == "random-rgb"
    report = tmp_path / "inspect.json"
    assert main(["inspect", str(package), "--json", str(report)]) == 0
    assert "OK: 1 file(s) verified" in capsys.readouterr().out  # the summary still printed
    assert json.loads(report.read_text())["name"] == "random-rgb"


def test_rebalance_and_evaluate_print_their_report_as_json(tiny_run, copy_run, capsys):
    run = copy_run(tiny_run)  # stage 1 only; la fits no layer, so this rebalance takes a moment
    assert main(["rebalance", str(run), "--heads", "la", "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # the table is not printed around it
    assert report["written"] == ["la"] and set(report["heads"]) == {"joint", "la"}
    assert main(["evaluate", str(run), "--split", "val", "--no-plots", "--json", "-"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["split"] == "val" and {"joint", "la"} <= set(results["heads"])


def test_data_verb_is_the_data_module(tmp_path, capsys):
    assert main(["data", "samples", str(tmp_path / "s"), "--count", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["labels.txt", "test_0.png", "test_1.png"]


def test_train_without_the_training_extra_names_it(tmp_path):
    out = tmp_path / "run"
    for argv in (["train", "configs/tiny.yaml", "--out", str(out)], ["demo", "--no-serve", "--run", str(out)]):
        proc = subprocess.run([sys.executable, "-c", WITHOUT_TRAIN_EXTRA, *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == EXIT_USAGE, proc.stderr
        assert f'error: ltserve {argv[0]} needs the training extra: pip install "ltserve[train]"' in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_serve_flags_come_from_the_settings_and_are_checked_first(package, tmp_path, capsys):
    from ltserve.cli.serve import build_parser

    flags = {a.dest.removeprefix("setting_") for a in build_parser()._actions if a.dest.startswith("setting_")}
    assert flags == set(ServiceSettings.model_fields) - {"model"}
    assert main(["serve", str(tmp_path)]) == EXIT_USAGE
    assert "not a model package" in capsys.readouterr().err
    assert main(["serve", str(package), "--top-k", "0", "--dry-run"]) == EXIT_USAGE
    assert "--top-k is LTSERVE_TOP_K" in capsys.readouterr().err
    assert main(["serve", str(package), "--api-key", "s3cret", "--dry-run"]) == 0
    line = capsys.readouterr().out
    assert f"LTSERVE_MODEL={package.resolve()}" in line and "s3cret" not in line


def test_serve_runs_bentoml_on_the_package_and_stops_on_sigterm(package, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LTSERVE_")}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([str(BIN / "ltserve"), "serve", str(package), "--host", "127.0.0.1", "--port", str(port),
                             "--top-k", "2", "--workers", "1", "--metrics-dir", str(tmp_path / "metrics")],
                            env={**env, "BENTOML_HOME": str(tmp_path / "bentoml")}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(400):
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            subprocess.run(["sleep", "0.3"])
        info = httpx.get(f"{url}/model", timeout=10).json()
        assert info["service"]["top_k"] == 2 and info["service"]["workers"] == 1
        assert "random-rgb" in json.dumps(info)
        proc.send_signal(signal.SIGTERM)  # the server itself: `ltserve serve` exec'd it
        proc.wait(timeout=60)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/readyz", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
