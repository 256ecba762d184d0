"""CLI: help, and bad input -> exit code 2 with a one-paragraph error naming the field."""

import json
import subprocess
import sys
import urllib.request

import pytest

from byztrain.cli import main


def test_help_lists_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "byztrain run" in out and "examples" in out


@pytest.mark.parametrize(
    "args, field",
    [
        (["run", "trian.lr=0.1"], "trian"),
        (["run", "train.lr=-1"], "train.lr"),
        (["run", "peers=4", "byzantine=4"], "byzantine"),
    ],
)
def test_bad_config_exit_code_and_message(args, field, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("byztrain: error:")
    assert f"'{field}'" in err


def test_missing_config_file(capsys, tmp_path):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_dataset_without_network(tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("BYZTRAIN_DATA", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["run", "task.dataset=mnist", f"task.data_dir={empty}", f"--out={tmp_path / 'run'}", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "mnist" in err.lower() and str(empty) in err


def test_console_script_runs_as_a_process():
    out = subprocess.run([sys.executable, "-m", "byztrain.cli", "run", "peers=-1"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "'peers'" in out.stderr


def test_run_prints_plain_progress_off_a_terminal_and_closes_with_what_happened(tmp_path, capsys):
    import torch

    previous = torch.get_num_threads()
    out = tmp_path / "r"
    try:
        code = main(["run", "peers=6", "byzantine=2", "defense.name=btard", "attack.name=sign_flip",
                     "attack.start=2", "train.steps=12", "train.eval_every=6", "train.batch_size=16",
                     "log.every=3", "log.tensorboard=false", "runtime.threads=1", f"--out={out}"])
    finally:
        torch.set_num_threads(previous)
    assert code == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    lines = captured.out.splitlines()
    assert lines[0].startswith("run: step 1/12") and len(lines) <= 12
    summary = json.loads((out / "summary.json").read_text())
    caught = sorted(s for p, s in summary["banned"].items() if int(p) in summary["byzantine_peers"])
    text = captured.out[captured.out.index("finished run"):]
    assert f"final test accuracy  {100 * summary['final_test_accuracy']:.1f}%" in text
    expected = f"attackers banned     {len(caught)} of 2"
    assert expected + (f", the last at step {caught[-1]}" if caught else "") in text
    assert f"honest peers banned  {summary['honest_banned']}" in text
    assert f"run folder           {out}" in text and f"byztrain report {out}" in text


def test_outcome_says_when_a_run_had_no_attackers_and_names_honest_peers_banned():
    from byztrain.cli import outcome
    from byztrain.config import Config

    summary = {"final_test_accuracy": 0.5, "best_test_accuracy": 0.625, "steps": 3, "wall_seconds": 75.2,
               "byzantine_peers": [], "banned": {"2": 3}}
    text = outcome(Config.from_dict({"name": "q", "peers": 4, "log": {"out": "runs/q"}}), summary).splitlines()
    assert text == [
        "finished q: 3 steps in 1m15s",
        "  final test accuracy  50.0% (best 62.5%)",
        "  attackers            none in this run (byzantine: 0)",
        "  honest peers banned  1: peers 2 (false positives)",
        "  run folder           runs/q",
        "  report               byztrain report runs/q",
    ]
