"""runners.train, backend axolotl: the recipe (an input YAML) deep-merged with
params.config, with base_model, datasets[].path, output_dir and dataset_prepared_path
set to the job's staged paths; validated by axolotl's own loader before any training
(a bad config fails here, with axolotl's message); then `python -m axolotl.cli.train`.
A run that leaves no weights is refused (never a placeholder). The checkpoint holds
what axolotl saved (a LoRA run: adapter_config.json + adapter_model.safetensors),
metrics.json and the merged config as axolotl_config.yml."""
import os
import re
import shutil
import subprocess
import sys

import common
from common import RunnerError

# A checkpoint's weights: one file, or shards (save_pretrained splits a model above its
# max_shard_size, 50 GB, into NAME-00001-of-0000N.EXT with NAME.EXT.index.json).
WEIGHTS = re.compile(r"^(adapter_model|model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)$")
LOSS = re.compile(r"\{'loss': '?([0-9.eE+-]+)'?")


def deep_merge(base, over):
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = deep_merge(base.get(k), v) if k in base else v
        return out
    return over


def merged_config(job) -> dict:
    recipe_name = job.get("recipe", "recipe")
    path = job.input(str(recipe_name))
    cfg = {}
    if path:
        cfg = common.read_yaml_mapping(path, "the axolotl recipe")
    elif job.get("recipe"):
        raise RunnerError(f"params.recipe names the input '{recipe_name}', which the step does not have")
    cfg = deep_merge(cfg, job.get("config", {}) or {})
    model = job.input("model") or job.get("model")
    if model:
        cfg["base_model"] = model
    if not cfg.get("base_model"):
        raise RunnerError("no base model: give an input named 'model', params.model, or base_model in the recipe")
    data = job.input("dataset")
    if data:
        entries = cfg.get("datasets") or [{"type": "completion", "field": job.get("text_column", "text")}]
        cfg["datasets"] = [dict(e, path=data) for e in entries]
    if not cfg.get("datasets"):
        raise RunnerError("no dataset: give an input named 'dataset', or datasets in the recipe")
    cfg["output_dir"] = os.path.join(job.tmp, "axolotl-out")
    cfg["dataset_prepared_path"] = os.path.join(job.tmp, "axolotl-prepared")
    return cfg


def weights_in(folder: str) -> list:
    """The weight files in a save_pretrained folder (shards included)."""
    return sorted(n for n in os.listdir(folder)
                  if WEIGHTS.match(n) and os.path.isfile(os.path.join(folder, n)))


def require_weights(folder: str) -> None:
    """Refuses a run that saved no weights: nothing is sealed (the seed wrote a
    placeholder instead)."""
    if not weights_in(folder):
        raise RunnerError(
            f"axolotl finished but wrote no weights (adapter_model.*, model.* or pytorch_model.*, "
            f".safetensors or .bin, shards included) to {folder}: refusing to seal an empty checkpoint")


def main(job) -> None:
    common.require("axolotl", "yaml")
    job.offline()
    import yaml

    cfg = merged_config(job)
    cfg_path = os.path.join(job.tmp, "axolotl_config.yml")
    with open(cfg_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=True)
    # Validation first, with axolotl's own loader: no training time on a bad config.
    check = subprocess.run(
        [sys.executable, "-c", "import sys; from axolotl.cli.config import load_cfg; load_cfg(sys.argv[1])", cfg_path],
        capture_output=True, text=True,
    )
    if check.returncode != 0:
        lines = [l for l in (check.stderr or check.stdout).splitlines() if l.strip() and not l.startswith("W1")]
        # axolotl's own words: from the last exception line of its traceback on.
        last = max((i for i, l in enumerate(lines) if re.match(r"^[\w.]*(Error|Exception)\b.*:", l)), default=0)
        raise RunnerError("axolotl refused the config (nothing was trained):\n" + "\n".join(lines[last:][:25]))
    common.progress(step=0, total=cfg.get("max_steps"))
    proc = subprocess.Popen([sys.executable, "-m", "axolotl.cli.train", cfg_path],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    steps, losses = 0, []
    for line in proc.stdout:
        sys.stdout.write(line)
        for m in LOSS.finditer(line):
            steps += 1
            losses.append({"step": steps, "loss": float(m.group(1))})
            common.progress(step=steps, total=cfg.get("max_steps"), loss=float(m.group(1)))
    if proc.wait() != 0:
        raise RunnerError(f"axolotl training failed (exit {proc.returncode}); its output is in the step's log")
    produced = cfg["output_dir"]
    require_weights(produced)
    for name in sorted(os.listdir(produced)):
        src = os.path.join(produced, name)
        if os.path.isfile(src) and name not in ("debug.log", "README.md"):
            shutil.copyfile(src, os.path.join(job.out, name))
    shutil.copyfile(cfg_path, os.path.join(job.out, "axolotl_config.yml"))
    common.write_json(os.path.join(job.out, "metrics.json"), {
        "backend": "axolotl", "steps": steps, "loss_curve": losses,
        "train_loss": losses[-1]["loss"] if losses else None,
        "adapter": cfg.get("adapter"), "base_model": str(job.get("model") or "input:model"),
    })
    print(f"axolotl trained {steps} steps" + (f", last loss {losses[-1]['loss']:.4f}" if losses else ""), flush=True)
