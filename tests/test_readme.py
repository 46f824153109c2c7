"""The examples of README.md and docs/*.md are executed, so the documentation cannot drift from the code.

Every fenced ```bash block of README.md and of the pages under docs/ is preceded by a marker:

    <!-- readme-test: NAME -->                 the block runs (README first, then docs/*.md by name, each in page
                                               order; one shared working directory)
    <!-- readme-test: not-run (reason) -->     the block is only checked: it parses (`bash -n`), and the commands,
                                               options, make targets, extras and config files it names exist

Runnable blocks run with `bash -euo pipefail` in one temporary directory (later blocks use what earlier ones made:
the quickstart's runs/quick and models/quick are served and predicted on), with the venv's bin first on PATH and the
repository's `configs/` linked in. A block that starts a server in the background (a line ending in `&`) gets a free
port instead of 3000 and a `curl` shell function that waits for /readyz before the first request and keeps a copy
of every answer; the harness stops the block's whole process group afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pytest

from ltserve.serve.process import free_port

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 400  # the page a person reads first; the rest belongs under docs/
BIN = Path(sys.executable).parent
MARKER = re.compile(r"<!--\s*readme-test:\s*(?:(?P<notrun>not-run)\s*\((?P<reason>[^)]*)\)|(?P<name>[\w.-]+))\s*-->")
SERVER_PORT = "3000"  # the port README blocks use; a free one is substituted
BLOCK_TIMEOUT_S = 300
HEADS = ["joint", "crt", "tau_norm", "lws", "ncm", "la", "tau_norm+la", "lws+la"]
PREDICTION_KEYS = {"label", "class_index", "probability", "shot_group", "top_k"}


# ---------------------------------------------------------------------------------------------------------------------
# Parsing README.md
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One fenced ```bash block: its marker (None when unmarked), code and 1-based line of the opening fence."""

    line: int
    code: str
    name: str | None = None
    not_run_reason: str | None = None
    page: str = "README.md"

    @property
    def runs(self) -> bool:
        return self.name is not None

    @property
    def label(self) -> str:
        return self.name or f"not-run@{self.where}"

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def parse_readme(text: str, page: str = "README.md") -> list[Block]:
    """Every ```bash block of a Markdown text, with the marker on the nearest non-blank line above its fence."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^(`{3,})\s*(\S*)", lines[i])
        if not fence:
            i += 1
            continue
        ticks, lang, start = fence.group(1), fence.group(2).lower(), i
        i += 1
        body = []
        while i < len(lines) and not re.fullmatch(rf"`{{{len(ticks)},}}\s*", lines[i]):  # closing: backticks only
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        above = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.fullmatch(above.strip())
        if marker is None:
            blocks.append(Block(start + 1, "\n".join(body) + "\n", page=page))
        elif marker.group("notrun"):
            blocks.append(Block(start + 1, "\n".join(body) + "\n", not_run_reason=marker.group("reason").strip(),
                                page=page))
        else:
            blocks.append(Block(start + 1, "\n".join(body) + "\n", name=marker.group("name"), page=page))
    return blocks


BLOCKS = [b for page in PAGES
          for b in parse_readme(page.read_text(encoding="utf-8"), str(page.relative_to(REPO)))]
RUN_BLOCKS = [b for b in BLOCKS if b.runs]


def strip_heredocs(code: str) -> str:
    """The block without here-document bodies (the Python of `python - <<'PY' ... PY` is not shell)."""
    out, end = [], None
    for line in code.splitlines():
        if end is not None:
            if line.strip() == end:
                end = None
            continue
        out.append(line)
        doc = re.search(r"<<-?\s*(['\"]?)(\w+)\1", line)
        if doc:
            end = doc.group(2)
    return "\n".join(out) + "\n"


def shell_commands(code: str) -> list[list[str]]:
    """Simple commands of a block (heredocs dropped, continuation lines joined, comments removed), as token lists."""
    commands: list[list[str]] = []
    for line in strip_heredocs(code).replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        redirect = False
        for token in lexer:
            if token and set(token) <= set("&|;<>()"):
                redirect = "<" in token or ">" in token  # the next word is a file or heredoc delimiter
                if not redirect:
                    if current:
                        commands.append(current)
                    current = []
            elif redirect:
                redirect = False
            else:
                current.append(token)
        if current:
            commands.append(current)
    return commands


def starts_server(code: str) -> bool:
    """Whether a block runs something in the background (a command line ending in `&`)."""
    for line in strip_heredocs(code).replace("\\\n", " ").splitlines():
        tokens = shlex.shlex(line, posix=True, punctuation_chars=True)
        tokens.whitespace_split = True
        words = list(tokens)
        if words and words[-1] == "&":
            return True
    return False


# ---------------------------------------------------------------------------------------------------------------------
# What a command may name: subcommands, options, make targets, extras, config files
# ---------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def help_text(program: tuple[str, ...]) -> str:
    """`PROGRAM --help` output; fails the test when the program or subcommand does not exist."""
    out = subprocess.run([*program, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    assert out.returncode == 0, f"`{' '.join(program)} --help` failed ({out.returncode}): {out.stderr[-2000:]}"
    return out.stdout


def ltserve_help(command: str, sub: str | None = None) -> str:
    """Help of `ltserve COMMAND` (`ltserve data SUB`: the subcommand's); for evaluate also the package evaluation's
    (`ltserve evaluate models/NAME --data`)."""
    text = help_text((str(BIN / "ltserve"), command, *([sub] if sub else [])))
    if command == "evaluate":
        text += help_text((sys.executable, "-c", "import sys; from ltserve.cli.evaluate import package_cli; "
                           "sys.exit(package_cli(sys.argv[1:]))"))
    return text


def _program_and_options(tokens: list[str]) -> tuple[str, str, list[str]] | None:
    """(help source, subcommand, options) of an ltserve / python -m ltserve.* / bentoml command, else None."""
    while tokens and re.match(r"^[A-Za-z_]\w*=", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    if not tokens:
        return None
    prog = Path(tokens[0]).name
    if prog == "ltserve" and len(tokens) > 1:
        return "ltserve", tokens[1], tokens[2:]
    if prog == "bentoml" and len(tokens) > 1:
        return "bentoml", tokens[1], tokens[2:]
    if "-m" in tokens[:-2]:
        module = tokens[tokens.index("-m") + 1]
        rest = tokens[tokens.index("-m") + 2:]
        if module in ("ltserve.cli", "ltserve") and rest:
            return "ltserve", rest[0], rest[1:]
        if module == "ltserve.data" and rest:
            return "ltserve.data", rest[0], rest[1:]
    return None


def check_command(tokens: list[str]) -> list[str]:
    """Problems with one command of a README block (empty when everything it names exists)."""
    problems = []
    for token in tokens:
        for cfg in re.findall(r"configs/[\w.-]+\.ya?ml", token):
            if not (REPO / cfg).is_file():
                problems.append(f"{cfg} does not exist")
    found = _program_and_options(tokens)
    if found is not None:
        source, sub, args = found
        if source == "ltserve":
            text = ltserve_help(sub, args[0] if sub == "data" and args and not args[0].startswith("-") else None)
        elif source == "bentoml":
            text = help_text((str(BIN / "bentoml"), sub))
        else:
            text = help_text((sys.executable, "-m", "ltserve.data", sub))
        for arg in args:
            if arg.startswith("--"):
                option = arg.split("=", 1)[0]
                if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text):
                    problems.append(f"`{source} {sub}` has no option {option}")
    elif Path(tokens[0]).name == "make":
        makefile = (REPO / "Makefile").read_text(encoding="utf-8")
        for arg in tokens[1:]:
            if "=" in arg:
                var = arg.split("=", 1)[0]
                if not re.search(rf"^{re.escape(var)}\s*[?:]?=", makefile, re.M):
                    problems.append(f"Makefile has no variable {var}")
            elif not arg.startswith("-") and not re.search(rf"^{re.escape(arg)}\s*:", makefile, re.M):
                problems.append(f"Makefile has no target {arg}")
    elif Path(tokens[0]).name == "pip" and "install" in tokens:
        extras = set(re.findall(r"^(\w+)\s*=\s*\[", (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.M))
        for arg in tokens:
            spec = re.fullmatch(r"\.\[([\w,]+)\]", arg)
            for extra in spec.group(1).split(",") if spec else []:
                if extra not in extras:
                    problems.append(f"pyproject.toml has no extra {extra!r}")
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# Running the blocks
# ---------------------------------------------------------------------------------------------------------------------


# `curl` for blocks that start a server: wait for /readyz (failing fast when the background job died), then run the
# real curl and keep a copy of its answer in $READMETEST_OUT/curl-N.out for the assertions.
CURL_WRAPPER = r"""
__readme_ready=0
__readme_n=0
curl() {
  if [ "$__readme_ready" = 0 ]; then
    local i
    for i in $(seq 1 600); do
      if command curl -sf -o /dev/null "http://127.0.0.1:@PORT@/readyz"; then __readme_ready=1; break; fi
      if ! kill -0 "$!" 2>/dev/null; then
        echo "readme-test: the background server exited before /readyz" >&2; return 1
      fi
      sleep 0.2
    done
    [ "$__readme_ready" = 1 ] || { echo "readme-test: /readyz did not answer 200 within 120 s" >&2; return 1; }
  fi
  __readme_n=$((__readme_n + 1))
  command curl "$@" | tee "$READMETEST_OUT/curl-$__readme_n.out"
}
"""


@dataclass
class BlockRun:
    """What running one block left: exit code, its output, and the copies of its curl answers."""

    block: Block
    returncode: int
    stdout: str
    stderr: str
    curl: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (f"block {self.block.label!r} ({self.block.where}) exited {self.returncode}\n"
                f"--- code\n{self.block.code}--- stdout (tail)\n{self.stdout[-4000:]}\n"
                f"--- stderr (tail)\n{self.stderr[-4000:]}")


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies left to a non-reaping init do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_group(pgid: int, timeout: float = 20.0) -> None:
    """SIGTERM the process group, SIGKILL it if it is still there after `timeout` s."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _group_alive(pgid):
                return
            time.sleep(0.2)


class ReadmeRunner:
    """Runs the runnable blocks in README order in one working directory; a block runs once, after its predecessors."""

    def __init__(self, workdir: Path, logs: Path) -> None:
        self.workdir, self.logs = workdir, logs
        (workdir / "configs").symlink_to(REPO / "configs", target_is_directory=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LTSERVE_")}
        self.env.update(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", BENTOML_HOME=str(logs / "bentoml"),
                        BENTOML_DO_NOT_TRACK="True", PYTHONUNBUFFERED="1")
        self.results: dict[str, BlockRun] = {}

    def result(self, name: str) -> BlockRun:
        for block in RUN_BLOCKS:
            if block.name not in self.results:
                self.results[block.name] = self._run(block)
            if block.name == name:
                return self.results[name]
        raise KeyError(f"README.md and docs/*.md have no runnable block {name!r}")

    def _run(self, block: Block) -> BlockRun:
        code, out_dir = block.code, self.logs / block.name
        out_dir.mkdir(exist_ok=True)
        server = starts_server(code)
        if server:
            port = str(free_port())
            code = CURL_WRAPPER.replace("@PORT@", port) + re.sub(rf"\b{SERVER_PORT}\b", port, code)
        script = out_dir / "block.sh"
        script.write_text(code, encoding="utf-8")
        # output to files, not pipes: a background server inherits them and would hold a pipe open
        stdout, stderr = out_dir / "stdout.txt", out_dir / "stderr.txt"
        with open(stdout, "wb") as so, open(stderr, "wb") as se:
            proc = subprocess.Popen(["bash", "-euo", "pipefail", str(script)], cwd=self.workdir, stdout=so,
                                    stderr=se, env={**self.env, "READMETEST_OUT": str(out_dir)},
                                    start_new_session=True)
            try:
                rc = proc.wait(BLOCK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                rc = -1
            finally:
                stop_group(proc.pid)
                proc.wait(10)
        curl = [p.read_text(encoding="utf-8") for p in sorted(out_dir.glob("curl-*.out"),
                                                               key=lambda p: int(p.stem.split("-")[1]))]
        return BlockRun(block, rc, stdout.read_text(errors="replace"), stderr.read_text(errors="replace"), curl)


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> ReadmeRunner:
    return ReadmeRunner(tmp_path_factory.mktemp("readme-workdir"), tmp_path_factory.mktemp("readme-logs"))


# ---------------------------------------------------------------------------------------------------------------------
# Per-block assertions (beyond exit code 0)
# ---------------------------------------------------------------------------------------------------------------------


def check_quickstart(run: BlockRun, work: Path) -> None:
    run_dir = work / "runs" / "quick"
    assert (run_dir / "run.json").is_file() and (run_dir / "backbone.safetensors").is_file()
    for head in HEADS:
        assert (run_dir / "heads" / f"{head}.safetensors").is_file(), f"no head {head} in {run_dir}/heads"
    report = json.loads((run_dir / "eval" / "test.json").read_text())
    assert set(HEADS) <= set(report["heads"]), report["heads"].keys()
    model = json.loads((work / "models" / "quick" / "model.json").read_text())
    assert (work / "models" / "quick" / "model.onnx").is_file()
    assert model["head"]["name"] in HEADS and len(model["labels"]) == 10
    assert re.search(r"^OK: \d+ file", run.stdout, re.M), "ltserve inspect did not verify the package"


def check_own_data(run: BlockRun, work: Path) -> None:
    info = json.loads((work / "runs" / "shop" / "run.json").read_text())
    assert info["class_names"] == ["class0", "class1", "class7"]
    assert info["epochs_done"] == 2
    assert (work / "runs" / "shop" / "heads" / "joint.safetensors").is_file()


def check_serve(run: BlockRun, work: Path) -> None:
    assert len(run.curl) == 4, f"expected 4 curl answers, got {len(run.curl)}"
    one, batch, model, raw = (json.loads(text) for text in run.curl)
    assert raw == one, "the raw body route answers as /classify for the same image"
    assert PREDICTION_KEYS <= set(one), one
    assert one["top_k"][0]["class_index"] == one["class_index"]
    assert [set(p) >= PREDICTION_KEYS for p in batch["predictions"]] == [True, True], batch
    assert batch["predictions"][0]["class_index"] == one["class_index"]
    assert abs(batch["predictions"][0]["probability"] - one["probability"]) < 1e-6
    assert model["labels"] == json.loads((work / "models" / "quick" / "model.json").read_text())["labels"]
    assert {"shot_groups", "head"} <= set(model), model.keys()
    assert (work / "samples" / "labels.txt").is_file()
    lines = {line.split(":", 1)[0]: line for line in run.stdout.splitlines() if ":" in line}
    assert one["label"] in lines.get("bentoml client", ""), run.stdout[-2000:]
    assert f":{one['class_index']}:{one['label']}" in lines.get("open inference protocol", ""), run.stdout[-2000:]


def check_predict(run: BlockRun, work: Path) -> None:
    listed = (work / "samples" / "labels.txt").read_text().split()[::2]
    rows = [json.loads(line) for line in (work / "predictions.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == listed
    assert all(PREDICTION_KEYS <= set(r) and "true_label" in r for r in rows)
    assert "accuracy on" in run.stdout, "the list's labels should give an accuracy line"
    assert re.search(r"^\| \w+ \| (\d+\.\d|empty) \| (\d+\.\d|empty) \| (\d+\.\d|empty) \| \d+\.\d \|", run.stdout, re.M), \
        "no Many/Medium/Few/All table from evaluate"


CHECKS = {"quickstart": check_quickstart, "own-data": check_own_data, "serve": check_serve, "predict": check_predict}


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------


def test_parser_reads_markers_and_skips_other_fences():
    text = ("<!-- readme-test: a -->\n```bash\necho a\n```\n```json\n```bash\n```\n"
            "<!-- readme-test: not-run (needs GPUs) -->\n\n```bash\necho b\n```\n```bash\necho c\n```\n")
    blocks = parse_readme(text)
    assert [(b.name, b.not_run_reason, b.code) for b in blocks] == [
        ("a", None, "echo a\n"), (None, "needs GPUs", "echo b\n"), (None, None, "echo c\n")]
    assert shell_commands("A=1 ltserve x --y 1 \\\n  --z & # c --w\npython - <<'PY'\n--no\nPY\n") == [
        ["A=1", "ltserve", "x", "--y", "1", "--z"], ["python", "-"]]
    assert starts_server("srv --port 3000 &   # comment\ncurl x\n") and not starts_server("a && b \\\n  c\n")


def test_every_bash_block_is_marked():
    unmarked = [b.where for b in BLOCKS if not b.runs and b.not_run_reason is None]
    assert not unmarked, (f"{unmarked}: precede every ```bash block with <!-- readme-test: NAME --> "
                          "(runs in tests/test_readme.py) or <!-- readme-test: not-run (reason) -->")
    assert all(b.not_run_reason for b in BLOCKS if not b.runs), "a not-run marker needs a reason"
    names = [b.name for b in RUN_BLOCKS]
    assert len(names) == len(set(names)), f"duplicate block names: {names}"
    assert set(CHECKS) <= set(names), f"README lost blocks that have checks here: {set(CHECKS) - set(names)}"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.label for b in BLOCKS])
def test_block_parses_and_names_what_exists(block):
    out = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"{block.where}: bash -n: {out.stderr}"
    problems = [f"{' '.join(cmd)}: {p}" for cmd in shell_commands(block.code) for p in check_command(cmd)]
    assert not problems, f"{block.where}:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", [b.name for b in RUN_BLOCKS])
def test_block_runs(runner, name):
    block = next(b for b in RUN_BLOCKS if b.name == name)
    if starts_server(block.code):
        assert shutil.which("curl"), "the README's serving example needs curl (.ci/run installs it)"
    before = [b.name for b in RUN_BLOCKS[:RUN_BLOCKS.index(block)]]
    failed = [n for n in before if n in runner.results and runner.results[n].returncode != 0]
    run = runner.result(name)
    assert run.returncode == 0, (f"(earlier blocks that failed: {failed})\n" if failed else "") + run.describe()
    if name in CHECKS:
        CHECKS[name](run, runner.workdir)


def test_checks_catch_what_does_not_exist():
    assert check_command(["ltserve", "predict", "m", "x", "--no-such-option"]) == [
        "`ltserve predict` has no option --no-such-option"]
    assert check_command(["make", "no-such-target", "NO_SUCH_VAR=1"]) == [
        "Makefile has no target no-such-target", "Makefile has no variable NO_SUCH_VAR"]
    assert check_command(["pip", "install", ".[cpu,nosuch]"]) == ["pyproject.toml has no extra 'nosuch'"]
    assert check_command(["ltserve", "train", "configs/nosuch.yaml"]) == ["configs/nosuch.yaml does not exist"]


def test_readme_stays_short_and_links_every_docs_page():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most {README_MAX_LINES}): move reference "
                                       "material to a page under docs/ and link it")
    readme = README.read_text(encoding="utf-8")
    unlinked = [p.name for p in PAGES[1:] if f"(docs/{p.name}" not in readme]
    assert not unlinked, f"README.md does not link these docs pages: {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
    """Every relative Markdown link of a page names a file or folder that exists (anchors not checked)."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    missing = [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")
               and not (page.parent / t.split("#", 1)[0]).exists()]
    assert not missing, f"{page.relative_to(REPO)}: links to nothing: {missing}"
