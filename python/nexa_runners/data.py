"""Records from a dataset input (JSONL, CSV or Parquet files, or a folder of them) or
from the Hugging Face hub, read the same way by every runner."""
import csv
import hashlib
import json
import os

from common import RunnerError, hub_error

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def files_of(path: str) -> list:
    if os.path.isfile(path):
        return [path]
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            if f.endswith(SUFFIXES) and f not in ("meta.json", "manifest.json", "metrics.json"):
                found.append(os.path.join(root, f))
    if not found:
        raise RunnerError(f"{path} holds no JSONL, CSV or Parquet file")
    return found


def read_file(path: str) -> list:
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise RunnerError("reading Parquet needs pyarrow: pip install pyarrow")
        return pq.read_table(path).to_pylist()
    if path.endswith((".csv", ".tsv")):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ","))
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise RunnerError(f"{os.path.basename(path)}:{n}: not JSON ({e})")
    return rows


def read_records(path: str) -> list:
    rows = []
    for f in files_of(path):
        rows.extend(read_file(f))
    return rows


def hub_records(name: str, config, split: str, network: bool) -> list:
    try:
        import datasets
    except ImportError:
        raise RunnerError(
            f"params.dataset '{name}' is a hub dataset and needs the datasets library: "
            "pip install datasets (or give the data as an input named 'dataset')"
        )
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds
        raise hub_error("dataset", name, e)
    return [dict(r) for r in ds]


def digest_of(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for f in files_of(path):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def texts_and_labels(rows: list, text_column: str, label_column, where: str):
    """Pulls the text (and label) columns out, failing with the record's number."""
    texts, labels = [], []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or text_column not in r:
            raise RunnerError(f"{where}: record {i + 1} has no '{text_column}' column (params.text_column)")
        texts.append(str(r[text_column]))
        if label_column is not None:
            if label_column not in r:
                raise RunnerError(f"{where}: record {i + 1} has no '{label_column}' column (params.label_column)")
            labels.append(r[label_column])
    return texts, labels


def label_ids(labels: list, names=None):
    """Maps labels to ids: ints stay as they are, strings get sorted ids (or the
    checkpoint's own names)."""
    if all(isinstance(l, int) or (isinstance(l, str) and l.lstrip("-").isdigit()) for l in labels) and not names:
        ids = [int(l) for l in labels]
        n = max(ids) + 1 if ids else 2
        return ids, [str(i) for i in range(max(n, 2))]
    names = list(names) if names else sorted({str(l) for l in labels})
    index = {n: i for i, n in enumerate(names)}
    out = []
    for l in labels:
        key = str(l)
        if key not in index:
            if key.lstrip("-").isdigit() and int(key) < len(names):
                out.append(int(key))
                continue
            raise RunnerError(f"label {key!r} is not one the model knows ({', '.join(names)})")
        out.append(index[key])
    return out, names
