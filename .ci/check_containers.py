#!/usr/bin/env python3
"""The compose stack, for real, with no image registry.

Builds the coordinator and worker images from host-built binaries (`--target prebuilt`)
on the local debootstrap base image (.ci/base_image.sh), and a Prometheus image from
Debian's binary; brings up docker/compose.yaml + docker/compose.test.yaml (coordinator,
three workers, Prometheus); then, driving it with the host's `nexa` CLI:

  1. a pipeline runs to completion across the worker containers, and so does the
     quickstart (its report identical to the embedded run's when that ran first);
  2. `docker kill` of the worker running a job: the job completes on another;
  3. the coordinator container is killed and started again mid-run: the run (followed
     by a `nexa pipeline run` that reconnects) completes, nothing is lost or redone;
  4. `docker network disconnect` of the worker running a job: its lease expires, the
     job completes elsewhere; reconnected, the worker rejoins;
  5. Prometheus (in the stack) scraped the coordinator.

Exit 1 with the reason on the first failure; the stack is torn down either way.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
PROJECT = "nexaci"
TAG = "ci"
BASE = "nexa/debian-base:bookworm"
TOKEN = "ci-operator"
ENROL = "ci-enrol"
CHECKS = []


def log(msg):
    print(f"[containers {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ok(what):
    CHECKS.append(what)
    log(f"ok: {what}")


def sh(*args, check=True, capture=True, env=None, timeout=300):
    r = subprocess.run(list(args), cwd=ROOT, env=env, text=True, timeout=timeout,
                       stdout=subprocess.PIPE if capture else None,
                       stderr=subprocess.STDOUT if capture else None)
    if check and r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(args)}\n{r.stdout or ''}")
    return r.stdout or ""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(what, f, seconds=60):
    deadline = time.time() + seconds
    last = None
    while time.time() < deadline:
        try:
            if f():
                return
        except Exception as e:  # the stack may be mid-restart
            last = e
        time.sleep(0.3)
    sys.exit(f"timed out after {seconds}s waiting for {what} (last error: {last})")


def compose_cmd():
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"]


class Stack:
    def __init__(self):
        self.ports = {k: free_port() for k in ("NEXA_PORT", "NEXA_METRICS_PORT",
                                               "NEXA_PROMETHEUS_PORT", "NEXA_GRAFANA_PORT")}
        self.env = dict(os.environ, NEXA_TAG=TAG, NEXA_OPERATOR_TOKEN=TOKEN,
                        NEXA_ENROL_TOKEN=ENROL, NEXA_RUNTIME_BASE=BASE,
                        **{k: str(v) for k, v in self.ports.items()})
        self.compose = compose_cmd() + ["-p", PROJECT, "-f", "docker/compose.yaml",
                                        "-f", "docker/compose.test.yaml"]
        self.url = f"http://127.0.0.1:{self.ports['NEXA_PORT']}"
        self.project = tempfile.mkdtemp(prefix="nexa-containers-")

    def dc(self, *args, check=True):
        return sh(*self.compose, *args, env=self.env, check=check)

    def container(self, service):
        cid = self.dc("ps", "-q", service).strip()
        if not cid:
            sys.exit(f"no container for {service}")
        return cid

    def network(self):
        cid = self.container("coordinator")
        nets = json.loads(sh("docker", "inspect", "-f",
                             "{{json .NetworkSettings.Networks}}", cid))
        return next(iter(nets))

    def nexa(self, *args, check=True, timeout=300):
        r = subprocess.run([os.path.join(BIN, "nexa"), "--coordinator", self.url,
                            "--token", TOKEN, *args], cwd=self.project, text=True,
                           capture_output=True, timeout=timeout)
        if check and r.returncode != 0:
            sys.exit(f"nexa {' '.join(args)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
        return r

    def nexa_bg(self, *args):
        out = open(os.path.join(self.project, f"{args[-1]}.out"), "w")
        return subprocess.Popen([os.path.join(BIN, "nexa"), "--coordinator", self.url,
                                 "--token", TOKEN, *args], cwd=self.project, text=True,
                                stdout=out, stderr=subprocess.STDOUT)

    def output_of(self, name):
        with open(os.path.join(self.project, f"{name}.out")) as f:
            return f.read()

    def workers(self):
        return json.loads(self.nexa("workers", "--json").stdout)

    def worker_named(self, name):
        return next(w for w in self.workers() if w["name"] == name)

    def status(self, file):
        return json.loads(self.nexa("pipeline", "status", file, "--json").stdout)

    def write(self, name, text):
        with open(os.path.join(self.project, name), "w") as f:
            f.write(text)


def step_of(status, sid):
    return next(s for s in status["steps"] if s["id"] == sid)


def busy_worker(stack):
    """The name of the one worker with a job running, once there is one."""
    found = []

    def one():
        busy = [w["name"] for w in stack.workers() if w["running"] > 0]
        found[:] = busy
        return len(busy) == 1
    wait("a worker to start the job", one, 60)
    return found[0]


def build_images():
    sh("bash", ".ci/base_image.sh", capture=False)
    env = dict(os.environ, DOCKER_BUILDKIT="0")
    for what in ("coordinator", "worker"):
        log(f"building nexa/{what}:{TAG} from target/release (--target prebuilt)")
        sh("docker", "build", "-q", "-f", f"docker/{what}.Dockerfile", "--target", "prebuilt",
           "--build-arg", f"RUNTIME_BASE={BASE}", "-t", f"nexa/{what}:{TAG}", ".", env=env)
    prom = shutil.which("prometheus")
    if not prom:
        sys.exit("Debian's prometheus is not installed (.ci/run installs it)")
    ctx = tempfile.mkdtemp(prefix="nexa-prom-ctx-")
    shutil.copy(prom, os.path.join(ctx, "prometheus"))
    log(f"building nexa/prometheus-debian:{TAG} from {prom}")
    sh("docker", "build", "-q", "-f", os.path.join(ROOT, "docker/prometheus-debian.Dockerfile"),
       "--build-arg", f"RUNTIME_BASE={BASE}", "-t", f"nexa/prometheus-debian:{TAG}", ctx, env=env)
    shutil.rmtree(ctx, ignore_errors=True)


def across_workers(stack):
    steps = "".join(f"""    - id: s{i}
      uses: exec
      after: []
      params: {{run: 'sleep 1; hostname > "$NEXA_OUT/host"; echo {i} > "$NEXA_OUT/i"'}}
      out: artifacts/s{i}
""" for i in range(9))
    stack.write("spread.yaml", f"pipeline:\n  name: spread\n  steps:\n{steps}")
    stack.nexa("pipeline", "run", "spread.yaml")
    st = stack.status("spread.yaml")
    done = [s for s in st["steps"] if s["status"] == "COMPLETE"]
    if len(done) != 9:
        sys.exit(f"spread: not all complete: {st}")
    used = {s["worker"] for s in done}
    if len(used) < 2:
        sys.exit(f"spread: all jobs ran on one worker: {used}")
    ok(f"a 9-step pipeline ran to completion across {len(used)} worker containers")


def quickstart_in_containers(stack):
    """The README's quickstart, its python scripts running in the worker containers."""
    r = subprocess.run([os.path.join(BIN, "nexa"), "--coordinator", stack.url, "--token", TOKEN,
                        "pipeline", "run", "pipelines/quickstart.yaml"],
                       cwd=ROOT, text=True, capture_output=True, timeout=300)
    if r.returncode != 0:
        sys.exit(f"quickstart in containers failed:\n{r.stdout}{r.stderr}")
    st = json.loads(subprocess.run(
        [os.path.join(BIN, "nexa"), "--coordinator", stack.url, "--token", TOKEN,
         "pipeline", "status", "pipelines/quickstart.yaml", "--json"],
        cwd=ROOT, text=True, capture_output=True, check=True).stdout)
    bad = [s for s in st["steps"] if s["status"] not in ("COMPLETE", "SKIPPED")]
    if bad or len(st["steps"]) != 7:
        sys.exit(f"quickstart in containers: {st}")
    report = step_of(st, "report")["hash"]
    local = os.path.join(ROOT, "artifacts", "quickstart", "report", "meta.json")
    same = ""
    if os.path.exists(local):
        with open(local) as f:
            embedded = json.load(f)["hash"]
        if embedded != report:
            sys.exit(f"quickstart: the containers' report {report} differs from the "
                     f"embedded run's {embedded}")
        same = ", its report byte-identical to the embedded run's"
    ok(f"the quickstart (7 steps, python in the worker containers) completed{same}")


def kill_a_worker(stack):
    stack.write("kill.yaml", """pipeline:
  name: kill
  steps:
    - id: slow
      uses: exec
      retries: 2
      params: {run: 'if [ "$NEXA_ATTEMPT" = 1 ]; then sleep 60; fi; hostname > "$NEXA_OUT/host"'}
      out: artifacts/slow
""")
    run = stack.nexa_bg("pipeline", "run", "kill.yaml")
    victim = busy_worker(stack)
    victim_key = stack.worker_named(victim)["id"]
    t0 = time.time()
    sh("docker", "kill", stack.container(victim))
    if run.wait(timeout=120) != 0:
        sys.exit(f"kill: the run failed:\n{stack.output_of('kill.yaml')}")
    st = step_of(stack.status("kill.yaml"), "slow")
    if st["status"] != "COMPLETE" or st["worker"] == victim_key:
        sys.exit(f"kill: {st}")
    ok(f"docker kill {victim} mid-job: the job completed on another worker "
       f"in {time.time() - t0:.1f}s")
    sh("docker", "start", stack.container(victim))
    wait(f"{victim} to rejoin after its restart",
         lambda: stack.worker_named(victim)["state"] == "active", 60)
    same = [w for w in stack.workers() if w["name"] == victim]
    if len(same) != 1 or same[0]["id"] != victim_key:
        sys.exit(f"kill: {victim} came back as a different worker: {same}")
    ok(f"{victim} restarted on its volume and rejoined as the same worker (same key)")


def restart_coordinator(stack):
    # Each step writes a random value: a step executed again would change its hash.
    steps = "".join(f"""    - id: c{i}
      uses: exec
      params: {{run: 'sleep 2; cat /proc/sys/kernel/random/uuid > "$NEXA_OUT/n"'}}
      out: artifacts/c{i}
""" for i in range(5))
    stack.write("chain.yaml", f"pipeline:\n  name: chain\n  steps:\n{steps}")
    run = stack.nexa_bg("pipeline", "run", "chain.yaml")
    before = {}

    def some_done():
        st = stack.status("chain.yaml")
        before.update({s["id"]: s["hash"] for s in st["steps"] if s["status"] == "COMPLETE"})
        return len(before) >= 2
    wait("two chain steps to complete", some_done, 60)
    coord = stack.container("coordinator")
    sh("docker", "kill", coord)
    time.sleep(1)
    sh("docker", "start", coord)
    t0 = time.time()
    if run.wait(timeout=180) != 0:
        sys.exit(f"restart: the followed run failed:\n{stack.output_of('chain.yaml')}")
    out = stack.output_of("chain.yaml")
    if "reconnected" not in out:
        sys.exit(f"restart: the CLI never lost the coordinator?\n{out}")
    st = stack.status("chain.yaml")
    for s in st["steps"]:
        if s["status"] not in ("COMPLETE", "SKIPPED") or not s["hash"]:
            sys.exit(f"restart: {s['id']} is {s['status']}: {st}")
        if s["id"] in before and s["hash"] != before[s["id"]]:
            sys.exit(f"restart: {s['id']} changed across the restart: {st}")
    ok(f"coordinator container killed and restarted after {len(before)}/5 steps: the run "
       f"completed {time.time() - t0:.1f}s later, the CLI followed it across the restart, "
       f"the steps done before kept their artifacts")


def cut_a_worker(stack):
    stack.write("cut.yaml", """pipeline:
  name: cut
  steps:
    - id: far
      uses: exec
      retries: 2
      params: {run: 'if [ "$NEXA_ATTEMPT" = 1 ]; then sleep 60; fi; hostname > "$NEXA_OUT/host"'}
      out: artifacts/far
""")
    wait("all three workers active",
         lambda: sum(w["state"] == "active" for w in stack.workers()) == 3, 60)
    run = stack.nexa_bg("pipeline", "run", "cut.yaml")
    victim = busy_worker(stack)
    victim_key = stack.worker_named(victim)["id"]
    cid, net = stack.container(victim), stack.network()
    t0 = time.time()
    sh("docker", "network", "disconnect", net, cid)
    if run.wait(timeout=120) != 0:
        sys.exit(f"cut: the run failed:\n{stack.output_of('cut.yaml')}")
    moved = time.time() - t0
    st = step_of(stack.status("cut.yaml"), "far")
    if st["status"] != "COMPLETE" or st["worker"] == victim_key:
        sys.exit(f"cut: {st}")
    state = stack.worker_named(victim)["state"]
    if state == "active":
        sys.exit(f"cut: {victim} still shows active while cut off")
    ok(f"network disconnect of {victim}: its lease expired, the job completed elsewhere in "
       f"{moved:.1f}s; it shows as {state}")
    sh("docker", "network", "connect", "--alias", victim, net, cid)
    t1 = time.time()
    wait(f"{victim} to rejoin after reconnecting",
         lambda: stack.worker_named(victim)["state"] == "active", 90)
    ok(f"reconnected, {victim} rejoined in {time.time() - t1:.1f}s")


def prometheus_scraped(stack):
    base = f"http://127.0.0.1:{stack.ports['NEXA_PROMETHEUS_PORT']}/api/v1/query?query="

    def query(q):
        with urllib.request.urlopen(base + urllib.parse.quote(q), timeout=5) as r:
            return json.loads(r.read())["data"]["result"]
    wait("Prometheus to scrape the coordinator",
         lambda: query('up{job="nexa"}')[0]["value"][1] == "1", 60)
    jobs = query("sum(nexa_jobs_finished_total)")
    if not jobs or float(jobs[0]["value"][1]) <= 0:
        sys.exit(f"prometheus: no finished jobs scraped: {jobs}")
    wait("Prometheus to scrape the three workers",
         lambda: len([r for r in query('up{job="nexa-workers"} == 1')]) == 3, 60)
    ok(f"Prometheus in the stack scraped the coordinator "
       f"({float(jobs[0]['value'][1]):.0f} finished jobs counted) and the three workers")


def main():
    started = time.time()
    for b in ("nexa-coordinator", "nexa-worker", "nexa"):
        if not os.path.exists(os.path.join(BIN, b)):
            sys.exit(f"target/release/{b} is missing: cargo build --release first")
    build_images()
    stack = Stack()
    stack.dc("down", "-v", "--remove-orphans", check=False)
    try:
        log("docker compose up (coordinator, worker-1..3, prometheus)")
        stack.dc("up", "-d", "--no-build")
        wait("three workers to join",
             lambda: sum(w["state"] == "active" for w in stack.workers()) == 3, 90)
        ok("the stack is up: coordinator, 3 workers joined with the enrolment token")
        across_workers(stack)
        quickstart_in_containers(stack)
        kill_a_worker(stack)
        restart_coordinator(stack)
        cut_a_worker(stack)
        prometheus_scraped(stack)
    except SystemExit:
        for svc in ("coordinator", "worker-1", "worker-2", "worker-3"):
            print(f"--- logs of {svc} (tail) ---")
            print(stack.dc("logs", "--tail", "40", svc, check=False))
        raise
    finally:
        stack.dc("down", "-v", "--remove-orphans", check=False)
        shutil.rmtree(stack.project, ignore_errors=True)
    log(f"{len(CHECKS)} checks passed in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
