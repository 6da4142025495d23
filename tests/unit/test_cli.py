import json
import os
import re
from collections.abc import Iterator
from importlib.metadata import version

import pytest

from flows import cli
from pipelines.errors import EXIT_FAILURE, EXIT_UNAVAILABLE, EXIT_USAGE, CbhError
from tests.conftest import ROOT


@pytest.fixture(autouse=True)
def _workspace(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """main() runs in this process: the repository is the workspace, and the environment
    variables it sets for Prefect and MLflow go away afterwards."""
    saved = dict(os.environ)
    monkeypatch.setenv("CBH_WORKSPACE", str(ROOT))
    yield
    os.environ.clear()
    os.environ.update(saved)


def _subcommands() -> dict[str, object]:
    (action,) = [a for a in cli.build_parser()._actions if a.dest == "command"]
    return action.choices


PUBLIC = sorted(set(_subcommands()) - {"stage"})


@pytest.mark.parametrize("command", PUBLIC)
def test_every_command_says_what_it_does(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = _subcommands()[command]
    assert parser.description and parser.description.rstrip().endswith(".")
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert " ".join(parser.description.split()[:6]) in " ".join(out.split())
    for action in parser._actions:
        assert action.help, f"cbh {command}: {action.dest} has no help"


def test_top_help_lists_the_commands_but_not_stage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    listed = re.findall(r"^    (\S+)", out, re.MULTILINE)            # the list, not its wrapped lines
    assert sorted(listed) == PUBLIC and "SUPPRESS" not in out and "stage" not in out.splitlines()[0]
    assert "exit codes:" in out and "3  something the command needs is missing" in out


def test_stage_is_still_accepted() -> None:
    args = cli.build_parser().parse_args(["stage", "split"])
    assert args.fn is cli.cmd_stage and args.name == "split"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"cbh {version('cbh')}"


def test_params_lists_every_key_with_its_meaning(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["params", "--set", "train.lr=0.01"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (lr,) = [line for line in lines if line.startswith("train.lr ")]
    assert lr.split()[:4] == ["train.lr", "0.01", "number", ">"] and "learning rate of the classifier" in lr
    assert any(line.startswith("segment.norm ") and "batch | instance" in line for line in lines)


def test_params_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["params", "--profile", "paper", "--json"]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["preprocess.size"]["value"] == 224 and rows["segment.channels"]["value"][0] == 32
    assert rows["train.resume"]["kind"] == "true | false" and rows["train.resume"]["description"]


def test_a_bad_override_is_one_sentence_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["params", "--set", "train.resume=flase"]) == EXIT_USAGE
    assert capsys.readouterr().err == "cbh params: override: train.resume: 'flase' is not a boolean (true or false)\n"


class _Missing(CbhError):
    exit_code = EXIT_UNAVAILABLE


@pytest.mark.parametrize("error, code", [(CbhError("x: cannot"), EXIT_FAILURE), (_Missing("x: absent"), 3),
                                         (cli.CommandError("x: refused"), EXIT_FAILURE)])
def test_a_cbh_error_exits_with_its_code(error: CbhError, code: int, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    def fail(*_: object) -> int:
        raise error
    monkeypatch.setattr(cli, "cmd_params", fail)
    assert cli.main(["params"]) == code
    assert capsys.readouterr().err == f"cbh params: {error}\n"


def test_anything_else_is_a_bug_with_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: object) -> int:
        raise KeyError("bug")
    monkeypatch.setattr(cli, "cmd_params", fail)
    with pytest.raises(KeyError):
        cli.main(["params"])


def test_a_second_writer_of_a_workspace_is_refused_naming_the_first(tmp_path):
    """`cbh ingest`, `cbh train`, the retrain flow and the stages share one writer lock: while one
    holds it another is refused at once with one sentence; a child of the holder passes."""
    import subprocess
    import sys

    from flows.stages import WRITER_ENV, StageError, workspace_writer

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from flows.stages import workspace_writer\n"
        f"with workspace_writer(Path({str(tmp_path)!r}), 'retrain'):\n"
        "    print('held', flush=True); time.sleep(30)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StageError, match=rf"another `cbh retrain` \(pid {holder.pid}\) is writing"):
            with workspace_writer(tmp_path, "ingest"):
                pass
        import os
        os.environ[WRITER_ENV] = str(tmp_path.resolve())       # as in a stage the holder started
        try:
            with workspace_writer(tmp_path, "stage train"):
                pass
        finally:
            os.environ.pop(WRITER_ENV)
    finally:
        holder.kill()
        holder.wait()
    with workspace_writer(tmp_path, "ingest"):                   # released when its holder died
        assert os.environ[WRITER_ENV] == str(tmp_path.resolve())
    assert WRITER_ENV not in os.environ
