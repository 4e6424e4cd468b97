"""Stand-ins for Slurm's `sbatch`, `srun` and `scontrol` that run a job on this machine.

    fake_slurm.py sbatch [options] SCRIPT [args...]
    fake_slurm.py srun [options] COMMAND [args...]
    fake_slurm.py scontrol show hostnames [NODELIST] | scontrol requeue JOBID

tests/slurm/conftest.py puts one wrapper per command first in PATH. What they emulate:

- sbatch reads the script's `#SBATCH` lines, then its own options (which win, as in
  Slurm), sets the batch environment (SLURM_JOB_ID, SLURM_JOB_NAME, SLURM_JOB_NUM_NODES,
  SLURM_JOB_NODELIST, SLURM_GPUS_ON_NODE, SLURM_CPUS_PER_TASK, SLURM_SUBMIT_DIR and, on a
  restart, SLURM_RESTART_COUNT) and execs `bash SCRIPT args` in the foreground: its pid is
  the batch shell's. The job id, node names and restart count come from FAKE_SLURM_JOB_ID,
  FAKE_SLURM_NODELIST and FAKE_SLURM_RESTART_COUNT.
- srun starts nodes x tasks-per-node local processes, each with the task variables
  (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_NTASKS, SLURM_NTASKS_PER_NODE,
  SLURMD_NODENAME, SLURM_STEP_ID, ...), writes each task's output to `--output` (%t task,
  %n node, %j job, %s step) or its own stdout, waits for all, and exits with the highest
  task status (128 + signal for a task killed by a signal), as srun does. Signals are
  handled as srun does (src/srun: SIGTERM, SIGHUP and SIGQUIT become SIGKILL of every
  task, "forcing job termination"; SIGUSR1, SIGUSR2, ... are forwarded). SIGINT is
  simplified to SIGKILL too (srun needs two within a second).
- scontrol expands node lists (`a[01-03],b`) and records `requeue JOBID`.

Every command appends a line to FAKE_SLURM_LOG (when set): `srun ARGS`, `srun pid PID`,
`task PROCID pid PID node NODEID step STEP`, `srun forwards SIGNAL as SIGNAL`,
`scontrol requeue JOBID`.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path


def record(line: str) -> None:
    path = os.environ.get("FAKE_SLURM_LOG")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def expand_hostnames(nodelist: str) -> list[str]:
    """Slurm's compact node lists: `gpu[01-02,05],login1` -> gpu01 gpu02 gpu05 login1."""
    names: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            names.append(plain)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                names += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
            else:
                names.append(prefix + part)
    return names


def parse_options(args: list[str], known: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """`--name=value`, `--name value`, `-X value` and flags up to the first operand; `known`
    maps every spelling to a canonical key. Unknown options are accepted and ignored."""
    options: dict[str, str] = {}
    i = 0
    while i < len(args) and args[i].startswith("-"):
        arg = args[i]
        name, eq, value = arg.partition("=")
        key = known.get(name)
        if key is not None and not eq:
            i += 1
            value = args[i]
        if key is not None:
            options[key] = value
        i += 1
    return options, args[i:]


SBATCH_OPTIONS = {
    "--job-name": "job_name",
    "-J": "job_name",
    "--nodes": "nodes",
    "-N": "nodes",
    "--gpus-per-node": "gpus_per_node",
    "--ntasks-per-node": "ntasks_per_node",
    "--cpus-per-task": "cpus_per_task",
    "-c": "cpus_per_task",
    "--output": "output",
    "-o": "output",
}


def sbatch(args: list[str]) -> None:
    cli, rest = parse_options(args, SBATCH_OPTIONS)
    script, script_args = Path(rest[0]), rest[1:]
    directives: list[str] = []
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH"):
            directives += shlex.split(line[len("#SBATCH") :])
    options, _ = parse_options(directives, SBATCH_OPTIONS)
    options.update(cli)
    job_id = os.environ.get("FAKE_SLURM_JOB_ID", "4242")
    nodes = int(options.get("nodes", "1"))
    hosts = expand_hostnames(os.environ.get("FAKE_SLURM_NODELIST", "localhost"))
    if len(hosts) < nodes:
        sys.exit(f"fake sbatch: {nodes} nodes asked, FAKE_SLURM_NODELIST has {len(hosts)}")
    env = dict(os.environ)
    env.update(
        SLURM_JOB_ID=job_id,
        SLURM_JOBID=job_id,
        SLURM_JOB_NAME=options.get("job_name", script.name),
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_NNODES=str(nodes),
        SLURM_JOB_NODELIST=",".join(hosts[:nodes]),
        SLURM_NODELIST=",".join(hosts[:nodes]),
        SLURM_SUBMIT_DIR=os.getcwd(),
        SLURM_GPUS_ON_NODE=options.get("gpus_per_node", "0"),
        SLURM_CPUS_PER_TASK=options.get("cpus_per_task", "1"),
        SLURM_NTASKS_PER_NODE=options.get("ntasks_per_node", "1"),
    )
    restart = int(os.environ.get("FAKE_SLURM_RESTART_COUNT", "0"))
    if restart:  # Slurm sets it only on a restarted (requeued) job
        env["SLURM_RESTART_COUNT"] = str(restart)
    record(f"sbatch job {job_id} restart {restart}")
    if "output" in options:
        # Like Slurm: relative to the submit directory, which must hold its directory.
        path = options["output"].replace("%x", env["SLURM_JOB_NAME"]).replace("%j", job_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    if os.environ.get("FAKE_SLURM_LOG"):
        env["FAKE_SLURM_STEP_COUNTER"] = f"{os.environ['FAKE_SLURM_LOG']}.{job_id}.{restart}.steps"
    os.execvpe("bash", ["bash", str(script), *script_args], env)


SRUN_OPTIONS = {
    "--nodes": "nodes",
    "-N": "nodes",
    "--ntasks": "ntasks",
    "-n": "ntasks",
    "--ntasks-per-node": "ntasks_per_node",
    "--output": "output",
    "-o": "output",
}
# srun(1): these make srun kill the step; everything else it catches is forwarded.
_KILLING = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGINT)
_FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT, signal.SIGALRM)


def _next_step_id() -> int:
    """0, 1, ... per job attempt (counted in FAKE_SLURM_STEP_COUNTER, a file sbatch names)."""
    counter = os.environ.get("FAKE_SLURM_STEP_COUNTER")
    if not counter:
        return 0
    path = Path(counter)
    step = int(path.read_text()) + 1 if path.exists() else 0
    path.write_text(str(step))
    return step


def srun(args: list[str]) -> None:
    record("srun " + shlex.join(args))
    record(f"srun pid {os.getpid()}")
    options, command = parse_options(args, SRUN_OPTIONS)
    nodes = int(options.get("nodes", os.environ.get("SLURM_JOB_NUM_NODES", "1")))
    if "ntasks_per_node" in options:
        per_node = int(options["ntasks_per_node"])
    else:
        per_node = max(int(options.get("ntasks", nodes)) // nodes, 1)
    ntasks = nodes * per_node
    hosts = expand_hostnames(os.environ.get("SLURM_JOB_NODELIST", "localhost"))[:nodes]
    job_id, step = os.environ.get("SLURM_JOB_ID", "0"), _next_step_id()
    tasks: list[subprocess.Popen] = []

    def on_signal(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        forward = signal.SIGKILL if signum in _KILLING else signum
        record(f"srun forwards {name} as {signal.Signals(forward).name}")
        for task in tasks:
            if task.poll() is None:
                os.kill(task.pid, forward)

    for signum in _KILLING + _FORWARDED:
        signal.signal(signum, on_signal)
    for node in range(nodes):
        for local in range(per_node):
            rank = node * per_node + local
            env = dict(os.environ)
            env.update(
                SLURM_PROCID=str(rank),
                SLURM_LOCALID=str(local),
                SLURM_NODEID=str(node),
                SLURM_NTASKS=str(ntasks),
                SLURM_NPROCS=str(ntasks),
                SLURM_NTASKS_PER_NODE=str(per_node),
                SLURM_STEP_NUM_NODES=str(nodes),
                SLURM_STEP_NUM_TASKS=str(ntasks),
                SLURM_STEP_NODELIST=",".join(hosts),
                SLURM_STEP_ID=str(step),
                SLURMD_NODENAME=hosts[node] if node < len(hosts) else f"node{node}",
            )
            output = None
            if "output" in options:
                path = options["output"]
                for key, value in (("%t", rank), ("%n", node), ("%j", job_id), ("%s", step)):
                    path = path.replace(key, str(value))
                output = open(path, "ab")  # noqa: SIM115 (closed with the task)
            # Own session: a signal to the caller's process group does not reach the task,
            # only what srun (or a test) sends it.
            tasks.append(
                subprocess.Popen(
                    command,
                    env=env,
                    stdout=output,
                    stderr=subprocess.STDOUT if output else None,
                    start_new_session=True,
                )
            )
            record(f"task {rank} pid {tasks[-1].pid} node {node} step {step}")
    status = 0
    for task in tasks:
        code = task.wait()
        status = max(status, code if code >= 0 else 128 - code)
    sys.exit(status)


def scontrol(args: list[str]) -> None:
    if args[:2] == ["show", "hostnames"]:
        nodelist = args[2] if len(args) > 2 else os.environ.get("SLURM_JOB_NODELIST", "")
        print("\n".join(expand_hostnames(nodelist)))
        return
    if args[:1] == ["requeue"] and len(args) == 2:
        record(f"scontrol requeue {args[1]}")
        return
    sys.exit(f"fake scontrol: unsupported arguments {args}")


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    {"sbatch": sbatch, "srun": srun, "scontrol": scontrol}[command](args)


if __name__ == "__main__":
    main()
