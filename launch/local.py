#!/usr/bin/env python3
"""Run one command as N cooperating JAX processes on this machine (multi-host without the hosts).

    python launch/local.py --num_processes=2 -- python -m cma_jax.main --config=configs/msrvtt.py --workdir=/tmp/run

Each process gets `--coordinator_address=localhost:<port> --num_processes=N --process_id=i`
appended (cma_jax.main joins the job with them; CPU processes use gloo collectives), and, with
--devices_per_process, that many simulated CPU devices. Output lines are prefixed with [i]. If a
process fails, the others are stopped and the launcher exits with its status. On Ctrl-C the processes
(which get the interrupt too) are given --grace_s seconds to save their last step. --dry_run prints
the commands instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def commands(args) -> list[tuple[dict, list[str]]]:
    """(extra environment, argv) for every process."""
    port = args.port or free_port()
    out = []
    for i in range(args.num_processes):
        env = {}
        if args.devices_per_process:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices_per_process}"
            env["JAX_PLATFORMS"] = "cpu"
        argv = list(args.command) + [f"--coordinator_address=localhost:{port}",
                                     f"--num_processes={args.num_processes}", f"--process_id={i}"]
        out.append((env, argv))
    return out


def _pump(i: int, stream) -> None:
    for line in iter(stream.readline, ""):
        sys.stdout.write(f"[{i}] {line}")
        sys.stdout.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num_processes", type=int, default=2, help="processes to start (default: 2)")
    p.add_argument("--devices_per_process", type=int, default=0,
                   help="simulated CPU devices per process (default 0: JAX's own)")
    p.add_argument("--port", type=int, default=0, help="coordinator port (default 0: a free one)")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--grace_s", type=float, default=120.0,
                   help="after Ctrl-C, seconds the processes get to save before they are stopped (default: 120)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every process runs")
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        p.error("give the command to run after --")
    if args.num_processes < 1:
        p.error("--num_processes must be >= 1")

    plan = commands(args)
    if args.dry_run:
        for env, cmd in plan:
            print(" ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.quote(c) for c in cmd]))
        return 0

    procs, pumps = [], []
    for i, (env, cmd) in enumerate(plan):
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        procs.append(proc)
        pumps.append(threading.Thread(target=_pump, args=(i, proc.stdout), daemon=True))
        pumps[-1].start()
    status = 0
    try:
        remaining = set(range(len(procs)))
        while remaining:
            for i in list(remaining):
                try:
                    rc = procs[i].wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    continue
                remaining.discard(i)
                if rc != 0 and status == 0:
                    status = rc
                    print(f"[launch] process {i} exited with {rc}; stopping the others", file=sys.stderr)
                    for j in remaining:
                        procs[j].terminate()
    except KeyboardInterrupt:
        # Ctrl-C reached every process (they share our process group) and each saves its last step:
        # let them finish (a second Ctrl-C or the grace period stops them).
        print(f"[launch] interrupted: waiting up to {args.grace_s}s for the processes to save", file=sys.stderr)
        try:
            for proc in procs:
                proc.wait(timeout=args.grace_s)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            pass
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        status = 130
    for proc in procs:
        proc.wait()
    for t in pumps:
        t.join(timeout=5)
    return status


if __name__ == "__main__":
    sys.exit(main())
