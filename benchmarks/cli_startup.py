"""How long does the `neodragon` command take to answer `--version` and `--help`?

Runs each command N times as a fresh process, interleaved round by round with the floor of any Python
tool (`python -c pass`), so all of them see the same machine load. Prints median and min wall time,
the ratio of each median to the 0.5 s target and to the floor.

    python benchmarks/cli_startup.py [--runs 10]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

TARGET_SECONDS = 0.5


def _neodragon() -> list[str]:
    """The installed console script, else the same entry point through this interpreter."""
    script = shutil.which("neodragon")
    return [script] if script else [sys.executable, "-c", "from neodragon_cli.app import main; main()"]


def _wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="fresh processes per command")
    args = parser.parse_args()
    cli = _neodragon()
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "neodragon --version": cli + ["--version"],
        "neodragon --help": cli + ["--help"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, argv in commands.items():
            times[name].append(_wall(argv))
    floor = statistics.median(times["python -c pass"])
    print(f"{'command':<22}{'median s':>10}{'min s':>9}{'/ target':>10}{'/ floor':>9}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<22}{median:>10.3f}{min(samples):>9.3f}{median / TARGET_SECONDS:>10.2f}{median / floor:>9.1f}")
    print(f"({args.runs} runs each; target {TARGET_SECONDS} s: a ratio under 1.00 meets it)")


if __name__ == "__main__":
    main()
