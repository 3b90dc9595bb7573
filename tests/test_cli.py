"""The command line: normal runs through Typer's CliRunner, error handling through a real process."""

import json
import subprocess
import sys

from typer.testing import CliRunner

from momctl.cli import app

runner = CliRunner()


def test_presets_lists_every_preset_as_json():
    result = runner.invoke(app, ["presets", "--json"])
    assert result.exit_code == 0
    names = [row["name"] for row in json.loads(result.stdout)]
    assert names == ["tiny", "small", "mom-340m", "mom-1.3b", "gdn-340m", "transformer-340m", "hybrid-340m"]


def test_smoke_runs_the_model_and_decode_matches_forward():
    result = runner.invoke(app, ["smoke", "--preset", "tiny", "--seq-len", "12", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["max_rel_error"] < 1e-4
    assert report["state_bytes_per_sequence"] > 0 and report["parameters"] > 0


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "momctl", *args], capture_output=True, text=True, timeout=120)


def test_user_errors_are_one_red_line_and_exit_1():
    for args, words in [(["smoke", "--preset", "mom-7b"], "unknown preset 'mom-7b'"),
                        (["smoke", "--seq-len", "1", "--device", "cpu"], "seq len 1"),
                        (["smoke", "--device", "cuda:0"] if not _has_cuda() else ["smoke", "--device", "tpu"],
                         "device")]:
        result = run_cli(*args)
        assert result.returncode == 1, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0] and words in lines[0], result.stderr
        assert "Traceback" not in result.stderr


def test_usage_errors_exit_2():
    result = run_cli("smoke", "--seq-len", "many")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def _has_cuda():
    import torch

    return torch.cuda.is_available()
