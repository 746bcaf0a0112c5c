#!/usr/bin/env python3
"""Holds the Grafana dashboards to the truth.

Starts a real coordinator and two workers from target/release, each with its metrics
port, starts Debian's Prometheus scraping all three every second, runs a pipeline
(validated steps included, so replication shows) while it scrapes, then evaluates EVERY
query of every panel of every dashboard in grafana/dashboards/ through Prometheus' HTTP
API. Each must parse and return at least one sample that is a number. Exit 1 otherwise.
"""

import glob
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
TOKEN = "dashboards"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def wait(what, f, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if f():
                return
        except Exception:
            pass
        time.sleep(0.25)
    sys.exit(f"timed out waiting for {what}")


def panels(board):
    for p in board.get("panels", []):
        yield p
        yield from p.get("panels", [])  # rows


def main():
    tmp = tempfile.mkdtemp(prefix="nexa-dashboards-")
    procs = []
    try:
        coord = subprocess.Popen(
            [os.path.join(BIN, "nexa-coordinator"), "serve", "--listen", "127.0.0.1:0",
             "--data-dir", os.path.join(tmp, "data"), "--open-enrolment",
             "--operator-token", TOKEN, "--metrics-listen", "127.0.0.1:0",
             "--heartbeat-ms", "300"],
            stdout=subprocess.PIPE, stderr=open(os.path.join(tmp, "coordinator.log"), "w"),
            text=True)
        procs.append(coord)
        metrics = addr = None
        while addr is None:
            line = coord.stdout.readline()
            if not line:
                sys.exit("the coordinator exited before listening")
            if line.startswith("metrics on "):
                metrics = line.split()[-1]
            elif line.startswith("listening on "):
                addr = line.split()[-1]
        url = f"http://{addr}"
        worker_ports = [free_port(), free_port()]
        for n in range(2):
            procs.append(subprocess.Popen(
                [os.path.join(BIN, "nexa-worker"), "join", url, "--name", f"w{n}",
                 "--slots", "2", "--work-dir", os.path.join(tmp, f"w{n}"),
                 "--key", os.path.join(tmp, f"w{n}.key"),
                 "--metrics-listen", f"127.0.0.1:{worker_ports[n]}"],
                stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(tmp, f"w{n}.log"), "w")))

        prom_port = free_port()
        config = os.path.join(tmp, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: nexa\n    static_configs:\n"
                    f"      - targets: ['{metrics}']\n"
                    "  - job_name: nexa-workers\n    static_configs:\n"
                    f"      - targets: ['127.0.0.1:{worker_ports[0]}', '127.0.0.1:{worker_ports[1]}']\n")
        procs.append(subprocess.Popen(
            ["prometheus", f"--config.file={config}",
             f"--storage.tsdb.path={os.path.join(tmp, 'tsdb')}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "prometheus.log"), "w")))
        prom = f"http://127.0.0.1:{prom_port}"

        def query(expr):
            q = urllib.parse.urlencode({"query": expr})
            return json.loads(get(f"{prom}/api/v1/query?{q}")[1])

        wait("prometheus to be ready", lambda: get(f"{prom}/-/ready")[0] == 200)
        wait("the coordinator to be scraped",
             lambda: query('up{job="nexa"}')["data"]["result"][0]["value"][1] == "1")
        wait("two workers", lambda: query('nexa_workers{state="active"}')["data"]["result"][0]["value"][1] == "2")

        project = os.path.join(tmp, "project")
        os.makedirs(project)
        steps = []
        for i in range(8):
            validation = "      validation: {replicas: 2, quorum: 2}\n" if i % 2 else ""
            steps.append(f"    - id: s{i}\n      uses: exec\n      after: []\n{validation}"
                         f"      params: {{run: 'sleep 0.3; echo {i} > \"$NEXA_OUT/n\"'}}\n"
                         f"      out: artifacts/s{i}\n")
        with open(os.path.join(project, "p.yaml"), "w") as f:
            f.write("pipeline:\n  name: dashboards\n  steps:\n" + "".join(steps))
        run = subprocess.run(
            [os.path.join(BIN, "nexa"), "--project-dir", project, "--coordinator", url,
             "--token", TOKEN, "pipeline", "run", os.path.join(project, "p.yaml")],
            capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            sys.exit(f"the pipeline failed:\n{run.stdout}\n{run.stderr}")
        # A few more scrapes so every rate() sees the run.
        time.sleep(4)

        failures = []
        boards = sorted(glob.glob(os.path.join(ROOT, "grafana", "dashboards", "*.json")))
        n_panels = n_queries = 0
        for path in boards:
            with open(path) as f:
                board = json.load(f)
            for p in panels(board):
                targets = p.get("targets", [])
                if not targets:
                    continue
                n_panels += 1
                for t in targets:
                    expr = t.get("expr", "")
                    n_queries += 1
                    where = f"{os.path.basename(path)}: panel '{p.get('title')}' {t.get('refId')}: {expr}"
                    try:
                        r = query(expr)
                    except urllib.error.HTTPError as e:
                        failures.append(f"{where}\n    does not parse: {e.read().decode()}")
                        continue
                    result = r.get("data", {}).get("result", [])
                    if r.get("status") != "success" or not result:
                        failures.append(f"{where}\n    returned no data: {r}")
                        continue
                    values = [float(x["value"][1]) for x in result] if r["data"]["resultType"] == "vector" else []
                    if any(math.isnan(v) for v in values):
                        failures.append(f"{where}\n    returned NaN: {result}")
        print(f"{len(boards)} dashboards, {n_panels} panels, {n_queries} queries evaluated "
              f"against a real Prometheus; {n_queries - len(failures)} returned data")
        if failures:
            print("panels that show nothing:\n  " + "\n  ".join(failures))
            sys.exit(1)
    finally:
        for p in reversed(procs):
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
