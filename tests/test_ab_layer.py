"""benchmarks/ab_layer.py: a commit's sources against the working tree, side by side, on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "ab_layer.py"
BENCH = ["--device", "cpu", "--mode", "decode", "--models", "mom", "--preset", "tiny", "--seq-len", "8",
         "--batch-size", "1", "--repeats", "2"]


def ab(tmp_path, *args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)


def test_runs_base_and_working_tree_alternately(tmp_path):
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    run = ab(tmp_path, "HEAD", str(tmp_path / "out"), "--rounds", "2", "--", *BENCH)
    assert run.returncode == 0, run.stderr
    doc = json.loads((tmp_path / "out" / "ab.json").read_text())
    assert doc["schema"] == "momctl-bench-ab/1"
    assert list(doc["runs"]) == [f"base {head}, run 1", "working tree, run 1", f"base {head}, run 2",
                                 "working tree, run 2"]
    commits = [r["environment"]["commit"] for r in doc["runs"].values()]
    assert commits[0] == commits[2] == head and commits[1].startswith(head)
    for r in doc["runs"].values():
        assert [(c["mode"], c["status"]) for c in r["results"]] == [("decode", "ok")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ab.json", "base1.json", "base2.json",
                                                                     "work1.json", "work2.json"]


def test_more_trees_from_commits_and_folders_of_sources(tmp_path):
    """--also: a folder of sources (as git archive unpacks them, named by its COMMIT file) and a commit, timed after
    the base and before the working tree."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    folder = tmp_path / "tree"
    folder.mkdir()
    tar = subprocess.run(["git", "archive", "HEAD", "momctl", "kernels", "export", "pyproject.toml"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    subprocess.run(["tar", "x", "-C", str(folder)], input=tar, check=True)
    (folder / "COMMIT").write_text("saved-tree\n")
    run = ab(tmp_path, "HEAD", str(tmp_path / "out"), "--also", str(folder), "--also", "HEAD", "--rounds", "1",
             "--", *BENCH)
    assert run.returncode == 0, run.stderr
    doc = json.loads((tmp_path / "out" / "ab.json").read_text())
    assert list(doc["runs"]) == [f"base {head}, run 1", "also1 saved-tree, run 1", f"also2 {head}, run 1",
                                 "working tree, run 1"]
    assert [r["environment"]["commit"] for r in doc["runs"].values()][:3] == [head, "saved-tree", head]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ab.json", "also1-1.json", "also2-1.json",
                                                                     "base1.json", "work1.json"]
    run = ab(tmp_path, "HEAD", str(tmp_path / "out"), "--also", str(tmp_path), "--", *BENCH)
    assert run.returncode == 1 and run.stderr.strip().startswith("error:") and "momctl/" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_bad_commit_and_missing_bench_arguments_are_one_line_errors(tmp_path):
    run = ab(tmp_path, "no-such-commit", str(tmp_path / "out"), "--", *BENCH)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().startswith("error: git rev-parse") and len(run.stderr.strip().splitlines()) == 1
    run = ab(tmp_path, "HEAD", str(tmp_path / "out"))
    assert run.returncode == 2 and "give momctl bench's arguments after --" in run.stderr
    run = ab(tmp_path, "HEAD", str(tmp_path / "out"), "--", *BENCH, "--json", "x.json")
    assert run.returncode == 2 and "without --json" in run.stderr
