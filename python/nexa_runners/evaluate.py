"""runners.eval: a checkpoint over a labelled dataset. Classification: accuracy, macro
precision / recall / F1 and the confusion matrix; causal LM: loss and perplexity.
Writes eval_report.json (metric names as keys), predictions.jsonl, report.md and
confusion_matrix.svg."""
import html
import json
import os

import checkpoint
import common
import data
from common import RunnerError


def options(job) -> dict:
    """The seed's eval config (a YAML naming the dataset, split, metrics, batch size),
    with the step's params over it."""
    opts = {"split": "test", "batch_size": 32, "max_length": 256, "text_column": "text", "label_column": "label"}
    cfg_path = job.input("config")
    if cfg_path:
        cfg = common.read_yaml_mapping(cfg_path, "the eval config")
        cfg = cfg.get("eval", cfg)
        opts.update({k: v for k, v in cfg.items() if v is not None})
    opts.update({k: v for k, v in job.params.items() if v is not None and k != "backend"})
    return opts


def rows_of(job, opts):
    path = job.input("dataset")
    if path:
        return data.read_records(path), os.path.basename(path.rstrip("/"))
    name = opts.get("dataset")
    if not name:
        raise RunnerError("the eval config names no 'dataset', and the step has no input 'dataset'")
    rows = data.hub_records(name, opts.get("dataset_config"), opts["split"], job.may_use_network())
    return rows, name


def svg_matrix(names, matrix, title) -> str:
    n = len(names)
    cell, left, top = 64, 140, 90
    w, h = left + cell * n + 30, top + cell * n + 60
    peak = max((max(r) for r in matrix), default=0) or 1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="13">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="24" text-anchor="middle" font-size="16">{html.escape(title)}</text>',
           f'<text x="{left + cell * n / 2}" y="{top - 36}" text-anchor="middle">predicted</text>',
           f'<text x="24" y="{top + cell * n / 2}" text-anchor="middle" transform="rotate(-90 24 {top + cell * n / 2})">true</text>']
    for i, name in enumerate(names):
        out.append(f'<text x="{left + cell * i + cell / 2}" y="{top - 10}" text-anchor="middle">{html.escape(name)}</text>')
        out.append(f'<text x="{left - 10}" y="{top + cell * i + cell / 2 + 5}" text-anchor="end">{html.escape(name)}</text>')
    for r in range(n):
        for c in range(n):
            v = matrix[r][c]
            shade = int(255 - 200 * v / peak)
            fill = f"rgb({shade},{shade},255)" if r == c else f"rgb(255,{shade},{shade})"
            x, y = left + cell * c, top + cell * r
            out.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}" stroke="#444"/>')
            colour = "white" if v > peak * 0.6 else "black"
            out.append(f'<text x="{x + cell / 2}" y="{y + cell / 2 + 5}" text-anchor="middle" fill="{colour}">{v}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(job) -> None:
    common.require("torch", "transformers", "yaml")
    job.offline()
    import transformers

    transformers.logging.set_verbosity_error()
    opts = options(job)
    ck = job.input("checkpoint")
    task = checkpoint.task_of(ck, opts.get("task"))
    rows, where = rows_of(job, opts)
    if opts.get("max_samples"):
        rows = rows[: int(opts["max_samples"])]
    label_col = None if task == "causal-lm" else opts["label_column"]
    texts, labels = data.texts_and_labels(rows, opts["text_column"], label_col, where)
    model, tok, device = checkpoint.load(ck, task)
    bs, ml = int(opts["batch_size"]), int(opts["max_length"])
    out = job.out
    if task == "causal-lm":
        loss, ppl = checkpoint.lm_loss(model, tok, device, texts, bs, ml)
        report = {"task": task, "loss": loss, "perplexity": ppl, "samples": len(texts), "dataset": where}
        with open(os.path.join(out, "predictions.jsonl"), "w", encoding="utf-8") as f:
            pass
    else:
        names = checkpoint.label_names(model)
        ids, names = data.label_ids(labels, names)
        preds, probs = checkpoint.classify(
            model, tok, device, texts, bs, ml, on_batch=lambda n: common.progress(records=n, total=len(texts))
        )
        report = common.classification_metrics(preds, ids, names)
        report.update({"task": task, "dataset": where})
        with open(os.path.join(out, "predictions.jsonl"), "w", encoding="utf-8") as f:
            for i, (r, p, pr) in enumerate(zip(rows, preds, probs)):
                rec = {"id": r.get("id", i), "label": names[ids[i]], "predicted": names[p], "score": round(max(pr), 6)}
                f.write(json.dumps(rec, sort_keys=True) + "\n")
        with open(os.path.join(out, "confusion_matrix.svg"), "w", encoding="utf-8") as f:
            f.write(svg_matrix(names, report["confusion_matrix"], f"{where}: accuracy {report['accuracy']:.3f}"))
    common.write_json(os.path.join(out, "eval_report.json"), report)
    lines = [f"# Evaluation on {where}", "", f"- task: {task}", f"- samples: {report['samples']}"]
    for k in ("accuracy", "precision", "recall", "f1", "loss", "perplexity"):
        if k in report:
            lines.append(f"- {k}: {report[k]:.4f}")
    if "per_label" in report:
        lines += ["", "| label | precision | recall | f1 | support |", "|---|---|---|---|---|"]
        for name, m in report["per_label"].items():
            lines.append(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
        lines += ["", "![confusion matrix](confusion_matrix.svg)"]
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    summary = ", ".join(f"{k} {report[k]:.3f}" for k in ("accuracy", "f1", "perplexity") if k in report)
    print(f"evaluated on {where} ({report['samples']} records): {summary}", flush=True)
