"""Time source trees side by side on one machine: a base commit (and others) against the working tree, alternating.

    python3 benchmarks/ab_layer.py BASE OUT_DIR [--also TREE]... [--rounds N] -- BENCH_ARGS...

e.g. `python3 benchmarks/ab_layer.py a3908c1 $OUT -- --layer --mode train,prefill --models mom --seq-len 1024
--batch-tokens 32768 --repeats 20`. BASE and each --also TREE is a commit, whose sources (git archive) go to a
temporary folder, or a folder holding such sources (momctl/, kernels/, export/, as `git archive COMMIT momctl kernels
export pyproject.toml` unpacks them; its COMMIT file, if any, names it), for a machine without the repository's
history. Then `momctl bench BENCH_ARGS` runs from each tree in turn, base first and the working tree last,
`--rounds` times, each writing OUT_DIR/<tree><round>.json (base, also1-, also2-, ..., work) with its own commit
(MOMCTL_COMMIT; the working tree's as `momctl bench` reports it). OUT_DIR/ab.json gathers them (schema
momctl-bench-ab/1) and a table of every cell's median goes to stdout. Runs the trees from their sources (no install),
so all use the same Python packages: compare only numbers from one call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The installed package maps these top-level folders into momctl (pyproject.toml's package-dir).
SUBPACKAGES = ("kernels", "export")


def source_tree(name: str, scratch: Path) -> tuple[Path, str]:
    """The folder holding tree `name`'s sources (a folder as given, or a commit archived under `scratch`) and its
    label: the folder's COMMIT file or name, or the commit's short hash."""
    folder = Path(name)
    if folder.is_dir():
        if not (folder / "momctl").is_dir():
            sys.exit(f"error: {name} holds no momctl/ folder: give a commit, or a folder of its sources")
        label_file = folder / "COMMIT"
        return folder.resolve(), label_file.read_text().strip() if label_file.exists() else folder.name
    into = scratch / str(len(list(scratch.iterdir())))
    return into, archive(name, into)


def archive(commit: str, into: Path) -> str:
    """The commit's sources under `into`; returns its short hash."""
    short = git("rev-parse", "--short", "--verify", f"{commit}^{{commit}}")
    tar = subprocess.run(["git", "archive", short, "momctl", *SUBPACKAGES, "pyproject.toml"], cwd=ROOT,
                         check=True, capture_output=True).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "x", "-C", str(into)], input=tar, check=True)
    return short


def git(*args: str) -> str:
    run = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"error: git {' '.join(args)}: {run.stderr.strip().splitlines()[-1]}")
    return run.stdout.strip()


def importable(tree: Path) -> None:
    """Link momctl/kernels and momctl/export to the tree's top-level folders, as an install would map them."""
    for name in SUBPACKAGES:
        link = tree / "momctl" / name
        if not link.exists():
            link.symlink_to(Path("..") / name)


def bench(tree: Path, commit: str | None, args: list[str], out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    if commit:
        env["MOMCTL_COMMIT"] = commit
    run = subprocess.run([sys.executable, "-m", "momctl", "bench", *args, "--json", str(out)], cwd=tree, env=env)
    if run.returncode:
        sys.exit(f"error: momctl bench failed in {tree} (exit {run.returncode}; its message is above)")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the commit (or folder of sources) to compare against")
    parser.add_argument("out", type=Path, help="folder for the bench JSON files and ab.json")
    parser.add_argument("--also", action="append", default=[], metavar="TREE",
                        help="another commit or folder of sources, timed after the base in each round (repeatable)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each tree, alternating (default 2)")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    opts, args = parser.parse_args(argv[:split]), argv[split + 1:]
    if opts.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not args or "--json" in args:
        parser.error("give momctl bench's arguments after --, without --json (each run writes its own)")
    opts.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        trees = []  # (file name tag, label, folder, commit for MOMCTL_COMMIT)
        for tag, name in [("base", opts.base)] + [(f"also{j}-", n) for j, n in enumerate(opts.also, 1)]:
            folder, commit = source_tree(name, Path(tmp))
            importable(folder)
            trees.append((tag, f"{tag.rstrip('-')} {commit}", folder, commit))
        importable(ROOT)
        trees.append(("work", "working tree", ROOT, None))
        runs = {}
        for i in range(1, opts.rounds + 1):
            for tag, label, folder, commit in trees:
                runs[f"{label}, run {i}"] = bench(folder, commit, args, opts.out / f"{tag}{i}.json")
    names = ", ".join(label for _, label, _, _ in trees[:-1])
    ab = {"schema": "momctl-bench-ab/1", "what": f"momctl bench {' '.join(args)}: {names} against the working tree, "
          f"alternating, {opts.rounds} runs each (benchmarks/ab_layer.py)", "runs": runs}
    (opts.out / "ab.json").write_text(json.dumps(ab, indent=1))
    for label, doc in runs.items():
        for r in doc["results"]:
            print(f"{label:24s} {doc['environment']['commit']:16s} {r['mode']:8s} {r['model']:12s} "
                  f"T={r['seq_len']:<6} B={r['batch_size']:<4} {r.get('median_ms') or float('nan'):8.2f} ms  "
                  f"{r['status']}")


if __name__ == "__main__":
    main()
