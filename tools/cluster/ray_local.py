"""A real multi-node Ray cluster on this machine's loopback addresses, to run and test the Ray launcher.

    python tools/cluster/ray_local.py up [STATE] [--workers 1] [--cpus 1] [--port 6390]
    source STATE/ray.env          # RAY_ADDRESS and the cluster's token, for the commands that use it
    python tools/cluster/ray_local.py kill-node [STATE] 127.0.0.3    # lose a node: kill -9 its processes
    python tools/cluster/ray_local.py add-node [STATE] 127.0.0.3     # a (new) node joins at that address
    python tools/cluster/ray_local.py down [STATE]

The head node listens on 127.0.0.2:PORT and worker node k on 127.0.0.(2+k): every node is a
separate raylet with its own CPUs (``--num-cpus``), as on separate machines, and no traffic
leaves the loopback range (Ray replaces 127.0.0.1 itself by the machine's network address, not
other loopback addresses). The cluster has its own authentication token (STATE/auth_token,
RAY_AUTH_MODE=token), so it neither uses nor needs ~/.ray. STATE (default
/tmp/tiled_hydra_ray) holds Ray's session directory; keep it short: Ray's socket paths inside it
must stay under 108 characters. ``down`` stops exactly the processes of this cluster (those whose
command line names STATE, and their children), never other Ray instances on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

DEFAULT_STATE = Path("/tmp/tiled_hydra_ray")
HEAD_IP = "127.0.0.2"
OBJECT_STORE_BYTES = 100 * 2**20  # the smallest Ray accepts is 75 MiB; jobs pass no large objects


def node_ip(k: int) -> str:
    return f"127.0.0.{2 + k}"


def cluster_env(state: Path, address: str) -> dict[str, str]:
    return {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(state / "auth_token"),
            "RAY_USAGE_STATS_ENABLED": "0"}


def ray_start(args: list[str], env: dict[str, str], log: Path) -> None:
    with open(log, "ab") as out:
        proc = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", *args, "--disable-usage-stats",
                               "--log-style=record", "--log-color=false"], env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=300)
    if proc.returncode != 0:
        sys.exit(f"ray start {' '.join(args)} failed (exit {proc.returncode}); see {log}")


def up(state: Path, workers: int, cpus: int, port: int) -> dict:
    state = state.absolute()
    if (state / "cluster.json").exists() and processes(state):
        sys.exit(f"a cluster is already running in {state}: python {sys.argv[0]} down {state}")
    state.mkdir(parents=True, exist_ok=True)
    token = state / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    address = f"{HEAD_IP}:{port}"
    env = {**os.environ, **cluster_env(state, address)}
    env.pop("RAY_ADDRESS")  # ray start --head must not look for a cluster
    started = time.perf_counter()
    ray_start(["--head", f"--node-ip-address={HEAD_IP}", f"--port={port}", f"--temp-dir={state / 'ray'}",
               "--include-dashboard=false", *client_server(port + 1), *node_options(cpus)], env, state / "up.log")
    for k in range(1, workers + 1):
        ray_start([f"--address={address}", f"--node-ip-address={node_ip(k)}", *node_options(cpus)], env, state / "up.log")
    nodes = wait_for_nodes(address, workers + 1, {**env, **cluster_env(state, address)})
    info = {"address": address, "env": cluster_env(state, address), "nodes": nodes, "cpus_per_node": cpus,
            "seconds_to_start": round(time.perf_counter() - started, 1)}
    (state / "cluster.json").write_text(json.dumps(info, indent=2))
    (state / "ray.env").write_text("".join(f"export {k}={v}\n" for k, v in info["env"].items()))
    return info


def client_server(port: int) -> list[str]:
    """The Ray client server's port, when it is installed (ray[client]; the minimal ray has none):
    not its default 10001, which a second cluster on this machine would also take."""
    import importlib.util

    return [f"--ray-client-server-port={port}"] if importlib.util.find_spec("grpc") else []


def node_options(cpus: int) -> list[str]:
    # Ports 0: each node's agents pick free ports (several nodes share this host).
    return [f"--num-cpus={cpus}", "--num-gpus=0", f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--dashboard-agent-listen-port=0", "--metrics-export-port=0", "--runtime-env-agent-port=0"]


def add_node(state: Path, ip: str) -> list[dict]:
    """A worker node joins the running cluster at ``ip`` (e.g. after kill-node); returns the live nodes."""
    info = json.loads((state / "cluster.json").read_text())
    env = {**os.environ, **info["env"]}
    alive = wait_for_nodes(info["address"], 1, env)
    ray_start([f"--address={info['address']}", f"--node-ip-address={ip}", *node_options(info["cpus_per_node"])],
              env, state / "up.log")
    return wait_for_nodes(info["address"], len(alive) + 1, env)


def wait_for_nodes(address: str, count: int, env: dict[str, str], timeout: float = 120) -> list[dict]:
    """The cluster's live nodes once ``count`` of them have registered (ip, node id, CPUs)."""
    probe = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
             "print(json.dumps([{'ip': n['NodeManagerAddress'], 'node_id': n['NodeID'], 'cpus': n['Resources'].get('CPU', 0)} "
             "for n in ray.nodes() if n['Alive']]))" % address)
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        nodes = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 and proc.stdout.strip() else []
        if len(nodes) >= count:
            return sorted(nodes, key=lambda n: n["ip"])
        if time.monotonic() > deadline:
            sys.exit(f"only {len(nodes)} of {count} Ray nodes registered at {address}: {proc.stderr[-500:]}")
        time.sleep(1)


def processes(state: Path) -> list[psutil.Process]:
    """This cluster's processes: every one whose command line names STATE, and their descendants
    (Ray's workers rename themselves to ray::..., so they are found as the raylet's children)."""
    tag, me = str(state.absolute()), os.getpid()
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != me and any(tag in arg for arg in proc.info["cmdline"] or []):
                found[proc.pid] = proc
                found.update({child.pid: child for child in proc.children(recursive=True)})
        except psutil.Error:
            continue
    return list(found.values())


def stop(procs: list[psutil.Process], grace: float) -> list[int]:
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM if grace else signal.SIGKILL)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace or 5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return sorted(p.pid for p in procs)


def down(state: Path) -> list[int]:
    return stop(processes(state), grace=5)


def kill_node(state: Path, ip: str) -> list[int]:
    """kill -9 the raylet of the node at ``ip`` and everything it started (its workers and
    agents): the node is gone as if its machine had failed."""
    raylets = [p for p in processes(state)
               if p.name() == "raylet" and f"--node_ip_address={ip}" in p.cmdline()]
    if not raylets:
        sys.exit(f"no Ray node at {ip} in {state}")
    procs = raylets + [c for r in raylets for c in r.children(recursive=True)]
    return stop(procs, grace=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start a head and --workers worker nodes")
    p_up.add_argument("state", nargs="?", type=Path, default=DEFAULT_STATE)
    p_up.add_argument("--workers", type=int, default=1, help="worker nodes besides the head (default 1)")
    p_up.add_argument("--cpus", type=int, default=1, help="CPUs each node offers (default 1)")
    p_up.add_argument("--port", type=int, default=6390, help="the head's GCS port (default 6390)")
    p_down = sub.add_parser("down", help="stop this cluster's processes")
    p_down.add_argument("state", nargs="?", type=Path, default=DEFAULT_STATE)
    p_kill = sub.add_parser("kill-node", help="kill -9 one node's processes")
    p_kill.add_argument("state", nargs="?", type=Path, default=DEFAULT_STATE)
    p_kill.add_argument("ip")
    p_add = sub.add_parser("add-node", help="start a worker node at IP (127.0.0.x) in the running cluster")
    p_add.add_argument("state", nargs="?", type=Path, default=DEFAULT_STATE)
    p_add.add_argument("ip")
    args = parser.parse_args()
    if args.command == "up":
        info = up(args.state, args.workers, args.cpus, args.port)
        for node in info["nodes"]:
            print(f"node {node['ip']}  {node['node_id']}  {node['cpus']:g} CPU")
        print(f"Ray cluster at {info['address']} ({info['seconds_to_start']} s); source {args.state.absolute() / 'ray.env'}")
    elif args.command == "down":
        print(f"stopped {len(down(args.state))} processes")
    elif args.command == "add-node":
        for node in add_node(args.state, args.ip):
            print(f"node {node['ip']}  {node['node_id']}  {node['cpus']:g} CPU")
    else:
        print(f"killed {' '.join(map(str, kill_node(args.state, args.ip)))}")


if __name__ == "__main__":
    main()
