"""Benchmark: `init` and `status` at the size of the original study (not a test).

Builds an 84,400-experiment plan over 2,000 hardware shapes (cores 1..64 x 32 memory sizes,
42 or 43 experiments each, a few parameters) as a CSV file in a temporary directory, then times
the installed `sdm-peer` command as real processes:

    sdm-peer init DB --plan FILE          (creates the database)
    sdm-peer status --db DB --json        (one status object)
    sdm-peer status --db DB               (the table a person reads)
    sdm-peer init DB --plan FILE          (again: must add nothing)

and prints a markdown table of wall-clock seconds. Usage:

    .venv/bin/python bench/init_status.py [--experiments 84400] [--configs 2000] [--repeat 3] [--keep]
"""

import argparse
import csv
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEMORY_GB = [0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128,
             160, 192, 224, 256, 320, 384, 512]
ALGORITHMS = ["maxent", "random_forest", "glm", "brt"]


def sdm_peer_command():
    local = Path(sys.executable).parent / "sdm-peer"
    found = str(local) if local.exists() else shutil.which("sdm-peer")
    if not found:
        sys.exit("sdm-peer is not installed next to this Python; run with the venv's python")
    return found


def build_plan(path, experiments, configs, seed=84_400):
    """Write the plan CSV; return the shapes in plan order."""
    shapes = [(cores, memory) for cores in range(1, 65) for memory in MEMORY_GB]
    if configs > len(shapes):
        sys.exit(f"at most {len(shapes)} configs")
    rng = random.Random(seed)
    rng.shuffle(shapes)
    shapes = shapes[:configs]
    per_config, extra = divmod(experiments, configs)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["cores", "memory_gb", "species", "algorithm", "replicate", "seed"])
        number = 0
        for index, (cores, memory) in enumerate(shapes):
            for replicate in range(per_config + (1 if index < extra else 0)):
                number += 1
                writer.writerow([cores, memory, f"species_{rng.randrange(1, 400):03d}", rng.choice(ALGORITHMS),
                                 replicate, number])
    assert number == experiments
    return shapes


def timed(command, *args, check=None):
    started = time.perf_counter()
    done = subprocess.run([command, *map(str, args)], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(map(str, args))} failed ({done.returncode}):\n{done.stderr}")
    if check is not None:
        check(done.stdout)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", type=int, default=84_400)
    parser.add_argument("--configs", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each read-only step (median shown)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    options = parser.parse_args()

    command = sdm_peer_command()
    work = Path(tempfile.mkdtemp(prefix="sdm-bench-init-"))
    try:
        plan, db = work / "plan.csv", work / "run.db"
        started = time.perf_counter()
        build_plan(plan, options.experiments, options.configs)
        build_seconds = time.perf_counter() - started

        def created(out):
            expected = f"{options.experiments:,} experiments added in {options.configs:,} new configs"
            assert expected in out, out

        def counted(out):
            status = json.loads(out)
            assert status["totals"]["total"] == options.experiments, status["totals"]
            assert status["totals"]["not_started"] == options.experiments
            assert len(status["configs"]) == options.configs

        def nothing_added(out):
            assert "0 experiments added in 0 new configs" in out, out

        rows = [("build the plan CSV (in-process, not timed as a command)", build_seconds, "")]
        rows.append(("`init DB --plan FILE` (new database)", timed(command, "init", db, "--plan", plan,
                                                                    check=created), ""))
        for label, args, check in (
                ("`status --db DB --json`", ("status", "--db", db, "--json"), counted),
                ("`status --db DB` (table)", ("status", "--db", db), None),
                ("`init DB --plan FILE` again (adds nothing)", ("init", db, "--plan", plan), nothing_added)):
            runs = [timed(command, *args, check=check) for _ in range(options.repeat)]
            rows.append((label, statistics.median(runs), f"median of {len(runs)}; min {min(runs):.2f}"))
        startup = [timed(command, "--help") for _ in range(options.repeat)]
        rows.append(("`--help` (interpreter + CLI start-up, for reference)", statistics.median(startup),
                     f"median of {len(startup)}"))

        print(f"\n{options.experiments:,} experiments, {options.configs:,} configs; plan "
              f"{plan.stat().st_size / 1e6:.1f} MB, database {db.stat().st_size / 1e6:.1f} MB; "
              f"Python {sys.version.split()[0]}\n")
        print("| step | seconds | note |")
        print("|---|---:|---|")
        for label, seconds, note in rows:
            print(f"| {label} | {seconds:.2f} | {note} |")
    finally:
        if options.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
