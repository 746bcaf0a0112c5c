"""runners.serve: starts a model server (backend hf_runtime: Nexa's own, in
hf_runtime.py; backend vllm: vLLM's OpenAI server with the seed's arguments) as a
service that outlives the job, waits until it is healthy (GET /health is 200 and the
model is listed by GET /v1/models), and writes handle.json: backend, endpoint, pid,
model and its digest, command, log. dry_run: true records the command and starts
nothing. `nexa serve list|health|stop` act on the handle from any later process."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import common
from common import RunnerError


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 2.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return None, b""


def healthy(endpoint: str, name: str) -> bool:
    status, _ = get(endpoint + "/health")
    if status != 200:
        return False
    status, body = get(endpoint + "/v1/models")
    try:
        return status == 200 and any(m.get("id") == name for m in json.loads(body).get("data", []))
    except (ValueError, AttributeError):
        return False


def command(backend: str, model: str, name: str, host: str, port: int, tp: int, port_file: str) -> list:
    here = os.path.dirname(os.path.abspath(__file__))
    if backend == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--host", host, "--port", str(port), "--served-model-name", name]
        if tp > 1:
            cmd += ["--tensor-parallel-size", str(tp)]
        return cmd
    return [sys.executable, os.path.join(here, "hf_runtime.py"), "--model", model, "--name", name,
            "--host", host, "--port", str(port), "--port-file", port_file]


def tail(path: str, n: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def main(job) -> None:
    backend = job.get("backend", "hf_runtime")
    if job.get("dry_run"):
        pass  # records the command only
    elif backend == "vllm":
        common.require("vllm")
    else:
        common.require("torch", "transformers")
    source = job.input("model") or job.input("checkpoint")
    model = source or job.get("model")
    if not model:
        raise RunnerError("runners.serve needs a model: an input named 'model' or 'checkpoint', or params.model")
    digest = os.environ.get("NEXA_DIGEST_MODEL") or os.environ.get("NEXA_DIGEST_CHECKPOINT")
    name = str(job.get("name") or os.environ.get("NEXA_STEP_ID") or "model")
    host = str(job.get("host", "127.0.0.1"))
    port = int(job.get("port", 8000))
    tp = int(job.get("tensor_parallel", 1))
    service_id = uuid.uuid4().hex
    services = os.environ.get("NEXA_SERVICES_DIR") or job.tmp
    home = os.path.join(services, f"{name}-{service_id[:12]}")
    os.makedirs(home, exist_ok=True)
    port_file = os.path.join(home, "port")
    if port == 0 and backend == "vllm":
        port = free_port(host)
    cmd = command(backend, model, name, host, port, tp, port_file)
    handle = {
        "name": name, "backend": backend, "model": job.get("model") or os.path.basename(model.rstrip("/")),
        "model_path": model, "model_digest": digest, "command": cmd, "host": host,
        "tensor_parallel": tp, "service_id": service_id, "log": os.path.join(home, "log"),
        "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    }
    if job.get("dry_run"):
        handle.update({"status": "dry_run", "port": port, "endpoint": f"http://{host}:{port}", "pid": None})
        common.write_json(os.path.join(job.out, "handle.json"), handle)
        print("dry run: " + " ".join(cmd), flush=True)
        return
    env = dict(os.environ)
    env["NEXA_SERVICE_ID"] = service_id
    if backend != "vllm":
        env["HF_HUB_OFFLINE"] = "0" if job.may_use_network() else "1"
    log = open(handle["log"], "ab")
    # Its own session: the service outlives this job's process group (which the worker
    # kills when the job ends) and is stopped through its handle.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                            cwd=home, start_new_session=True)
    deadline = time.time() + float(job.get("ready_timeout", 600))
    endpoint = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RunnerError(f"the {backend} server exited with {proc.returncode} before it was healthy:\n{tail(handle['log'])}")
        if endpoint is None:
            if port != 0:
                endpoint = f"http://{host}:{port}"
            elif os.path.exists(port_file):
                port = int(open(port_file).read().strip())
                endpoint = f"http://{host}:{port}"
        if endpoint and healthy(endpoint, name):
            break
        time.sleep(0.25)
    else:
        os.killpg(proc.pid, 9)
        raise RunnerError(f"the {backend} server was not healthy after {job.get('ready_timeout', 600)} s:\n{tail(handle['log'])}")
    handle.update({"status": "healthy", "port": port, "endpoint": endpoint, "pid": proc.pid,
                   "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    common.write_json(os.path.join(job.out, "handle.json"), handle)
    print(f"serving {name} ({backend}) at {endpoint} (pid {proc.pid})", flush=True)
