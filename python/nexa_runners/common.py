"""What every runner shares: the job's params, inputs and output, clear failures with
the exact `pip install` line, progress lines the worker forwards, and JSON output."""
import json
import os
import sys
import time

# A line the worker reads from the job's output and forwards as progress.
PROGRESS_PREFIX = "::nexa-progress::"


class RunnerError(Exception):
    """A failure the user can act on; printed without a traceback."""


def fail(message: str) -> None:
    print(f"nexa-runner: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _pins() -> dict:
    pins = {}
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        with open(os.path.join(here, "requirements.txt"), encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if "==" in line and not line.startswith("#"):
                    name = line.split("==", 1)[0]
                    pins[name] = line
    except OSError:
        pass
    return pins


def require(*modules: str) -> None:
    """Fails with the exact pip line when a package is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pins = _pins()
        line = " ".join(pins.get(m, m) for m in missing)
        raise RunnerError(
            f"{sys.executable} lacks {', '.join(missing)}: run `{sys.executable} -m pip install {line}` "
            "(or `bash python/setup.sh` in the Nexa repo and set NEXA_PYTHON to what it prints)"
        )


def progress(**fields) -> None:
    """One progress line (step/total, loss, records...) for `nexa pipeline run`."""
    fields["t"] = round(time.time(), 3)
    print(PROGRESS_PREFIX + " " + json.dumps(fields, sort_keys=True), flush=True)


def read_yaml_mapping(path: str, what: str) -> dict:
    """A YAML file that must hold a mapping (an empty file is an empty one)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            value = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise RunnerError(f"{what} {os.path.basename(path)}: {e}")
    if not isinstance(value, dict):
        raise RunnerError(f"{what} {os.path.basename(path)} must be a mapping")
    return value


def write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


class Job:
    """The job as the worker describes it in the environment."""

    def __init__(self, params: dict, inputs: dict, out: str, tmp: str):
        self.params = params
        self.inputs = inputs
        self.out = out
        self.tmp = tmp

    @staticmethod
    def from_env() -> "Job":
        try:
            params = json.loads(os.environ.get("NEXA_PARAMS") or "null") or {}
        except ValueError as e:
            raise RunnerError(f"NEXA_PARAMS is not JSON: {e}")
        if not isinstance(params, dict):
            raise RunnerError("params must be a mapping")
        inputs = {}
        for k, v in os.environ.items():
            if k.startswith("NEXA_IN_") and k != "NEXA_IN__RUNNER":
                inputs[k[len("NEXA_IN_"):].lower()] = v
        out = os.environ.get("NEXA_OUT")
        if not out:
            raise RunnerError("NEXA_OUT is not set: run this through Nexa")
        tmp = os.environ.get("NEXA_TMP") or out
        return Job(params, inputs, out, tmp)

    def get(self, key: str, default=None):
        v = self.params.get(key)
        return default if v is None else v

    def input(self, name: str):
        return self.inputs.get(name)

    def may_use_network(self) -> bool:
        return bool(self.params.get("network"))

    def offline(self) -> None:
        """Hub access only when the step may use the network."""
        if not self.may_use_network():
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["HF_DATASETS_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"


def hub_error(what: str, name: str, err: Exception) -> RunnerError:
    """The error for a hub model or dataset that could not be loaded offline."""
    return RunnerError(
        f"cannot load {what} '{name}' ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
        f"This step has no network (HF_HUB_OFFLINE=1): pre-fetch it on the worker with "
        f"`huggingface-cli download {name}`{' --repo-type dataset' if what == 'dataset' else ''}, "
        f"give it as an input folder, or set params.network: true"
    )


def device_info() -> dict:
    import torch

    info = {"cuda": bool(torch.cuda.is_available()), "torch": torch.__version__}
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
    return info


def classification_metrics(preds: list, labels: list, names: list) -> dict:
    """Accuracy, macro precision / recall / F1 and the confusion matrix (rows: true
    label, columns: predicted)."""
    n = len(names)
    matrix = [[0] * n for _ in range(n)]
    for p, t in zip(preds, labels):
        if 0 <= t < n and 0 <= p < n:
            matrix[t][p] += 1
    total = max(len(labels), 1)
    correct = sum(matrix[i][i] for i in range(n))
    precision, recall, f1 = [], [], []
    for c in range(n):
        tp = matrix[c][c]
        predicted = sum(matrix[r][c] for r in range(n))
        actual = sum(matrix[c])
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        precision.append(p)
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {
        "accuracy": correct / total,
        "precision": mean(precision),
        "recall": mean(recall),
        "f1": mean(f1),
        "samples": len(labels),
        "labels": names,
        "confusion_matrix": matrix,
        "per_label": {
            names[c]: {"precision": precision[c], "recall": recall[c], "f1": f1[c], "support": sum(matrix[c])}
            for c in range(n)
        },
    }
