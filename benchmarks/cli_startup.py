"""How long does the `neodragon` command take to answer `--version` and `--help`?

Runs each command N times as a fresh process, interleaved round by round with the floor of any Python
tool (`python -c pass`), so all of them see the same machine load. Prints median and min wall time,
the ratio of each median to the 0.5 s target and to the floor, and the median CPU time (user + system)
of the process, which other work on a busy machine inflates less than the wall time.

    python benchmarks/cli_startup.py [--runs 10]
"""

from __future__ import annotations

import argparse
import os
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


def _run(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run of `argv`."""
    cpu_before = os.times()
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    cpu_after = os.times()
    return wall, (cpu_after.children_user - cpu_before.children_user) + (cpu_after.children_system - cpu_before.children_system)


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
    walls: dict[str, list[float]] = {name: [] for name in commands}
    cpus: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, argv in commands.items():
            wall, cpu = _run(argv)
            walls[name].append(wall)
            cpus[name].append(cpu)
    floor = statistics.median(walls["python -c pass"])
    print(f"{'command':<22}{'median s':>10}{'min s':>9}{'/ target':>10}{'/ floor':>9}{'cpu s':>8}")
    for name, samples in walls.items():
        median = statistics.median(samples)
        cpu = statistics.median(cpus[name])
        print(f"{name:<22}{median:>10.3f}{min(samples):>9.3f}{median / TARGET_SECONDS:>10.2f}{median / floor:>9.1f}{cpu:>8.3f}")
    print(f"({args.runs} runs each; target {TARGET_SECONDS} s: a ratio under 1.00 meets it)")


if __name__ == "__main__":
    main()
