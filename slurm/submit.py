"""Render slurm/train.sbatch from a Hydra config and submit it.

    python -m slurm.submit [--dry-run] +launcher=slurm launcher.nodes=4 experiment=res_256 name=res256
    python -m slurm.submit +launcher=slurm name=lr_sweep optimizer.lr=1e-4,3e-4,1e-3   # a job array

The overrides are the trainer's. They are composed and validated here, for the
world size the launcher asks for, so a bad key fails now and not after hours in
the queue. The rendered script (the #SBATCH lines from `launcher.*`, then the
body of slurm/train.sbatch with the overrides baked in) is written into the run
directory beside its log, `slurm-<job id>.out`, so the exact submission can be
read and resubmitted.

A sweep (Hydra's sweep syntax: `a=1,2`, `range(...)`, `choice(...)`) becomes one
job array; task i trains into `<run_root>/<name>/<i>` and `tasks.json` lists
each task's overrides.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys

from slurm.resolve import compose_config
from trainer.config import LauncherConfig, TrainConfig
from trainer.train import to_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Cartesian product of the sweep overrides; [overrides] when there is none."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            key = o.get_key_element()
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(c) for c in itertools.product(*choices)]


def sbatch_header(launcher: LauncherConfig, job_name: str, output: str, array: int | None) -> list[str]:
    flags = [f"--job-name={launcher.job_name or job_name}", f"--nodes={launcher.nodes}", "--ntasks-per-node=1"]
    if launcher.gpus_per_node:
        flags.append(f"--gpus-per-node={launcher.gpus_per_node}")
    for key in ("cpus_per_task", "mem", "time", "partition", "account", "qos"):
        value = getattr(launcher, key)
        if value is not None:
            flags.append(f"--{key.replace('_', '-')}={value}")
    flags += ["--requeue", f"--signal={launcher.warning_signal}@{launcher.warning_seconds}", "--open-mode=append",
              f"--output={output}"]
    if array is not None:
        flags.append(f"--array=0-{array - 1}")
    flags += list(launcher.sbatch)
    return [f"#SBATCH {f}" for f in flags]


def render(launcher: LauncherConfig, overrides: list[str], job_name: str, output: str,
           sweep_dir: str | None = None, num_tasks: int | None = None) -> str:
    env = {"K2_ROOT": os.getcwd(), "K2_PYTHON": launcher.python or sys.executable,
           "K2_MAX_FAILURES": str(launcher.max_failures)}
    if launcher.procs_per_node or not launcher.gpus_per_node:
        env["K2_PROCS_PER_NODE"] = str(launcher.procs_per_node or 1)
    if launcher.rdzv_port:
        env["K2_RDZV_PORT"] = str(launcher.rdzv_port)
    if sweep_dir:
        env["K2_SWEEP_DIR"] = sweep_dir
    with open(os.path.join(HERE, "train.sbatch")) as f:
        body = [line.rstrip("\n") for line in f if not line.startswith(("#!", "#SBATCH"))]
    lines = ["#!/bin/bash", "# Rendered by `python -m slurm.submit`; resubmit with `sbatch <this file>`.",
             *sbatch_header(launcher, job_name, output, num_tasks),
             *(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
             *launcher.setup,
             "set -- " + " ".join(shlex.quote(o) for o in overrides),
             *body]
    return "\n".join(lines) + "\n"


def checked_config(overrides: list[str]) -> TrainConfig:
    cfg = to_config(compose_config(overrides))  # unknown keys too, as the trainer checks them
    cfg.validate(cfg.launcher.world_size)
    return cfg


def submit(overrides: list[str], dry_run: bool = False) -> dict:
    tasks = expand_sweep(overrides)
    sweep = len(tasks) > 1
    named = any(o.startswith("name=") for o in overrides)
    if sweep and not named:
        raise ValueError("a sweep needs name=...: its tasks train into <run_root>/<name>/<task>")
    base = checked_config(tasks[0])
    if sweep:
        folder = os.path.abspath(base.run_dir)
        os.makedirs(folder, exist_ok=True)
        tasks = [[o for o in t if not o.startswith(("name=", "run_root="))] + [f"run_root={folder}", f"name={i}"]
                 for i, t in enumerate(tasks)]
        for i, task in enumerate(tasks):
            checked_config(task)
            with open(os.path.join(folder, f"task_{i}.overrides"), "w") as f:
                f.write("\n".join(task) + "\n")
        with open(os.path.join(folder, "tasks.json"), "w") as f:
            json.dump({str(i): t for i, t in enumerate(tasks)}, f, indent=1)
        # The overrides live in the task files; the script itself passes none.
        script = render(base.launcher, [], base.name, os.path.join(folder, "slurm-%A_%a.out"), folder, len(tasks))
    else:
        # Unnamed: the run is named after the job id, known only once submitted.
        folder = os.path.abspath(base.run_dir if named else base.run_root)
        os.makedirs(folder, exist_ok=True)
        script = render(base.launcher, tasks[0], base.name if named else "k2train",
                        os.path.join(folder, "slurm-%j.out"))
    path = os.path.join(folder, "train.sbatch")
    with open(path, "w") as f:
        f.write(script)
    if dry_run:
        return {"script": path, "job_id": None, "tasks": len(tasks)}
    out = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch {path} failed: {out.stderr.strip()}")
    job_id = out.stdout.strip().split(";")[0]
    return {"script": path, "job_id": job_id, "tasks": len(tasks),
            "log": os.path.join(folder, f"slurm-{job_id}.out" if not sweep else f"slurm-{job_id}_<task>.out")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="render and check, do not submit")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of configs/train.yaml")
    args = p.parse_args(argv)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        info = submit(args.overrides, args.dry_run)
    except (ValueError, RuntimeError, HydraException, OmegaConfBaseException) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if info["job_id"] is None:
        print(f"rendered {info['script']} ({info['tasks']} task(s)); not submitted")
    else:
        print(f"submitted job {info['job_id']} ({info['tasks']} task(s)): {info['script']}\nlog: {info['log']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
