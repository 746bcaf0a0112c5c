"""runners.infer: a checkpoint over a dataset input (one shard of it when the step is
fanned out), writing predictions.jsonl: one line per record, in the input's order."""
import json
import os

import checkpoint
import common
import data


def main(job) -> None:
    common.require("torch", "transformers")
    job.offline()
    import transformers

    transformers.logging.set_verbosity_error()
    ck = job.input("checkpoint")
    task = checkpoint.task_of(ck, job.get("task"))
    if task != "sequence-classification":
        raise common.RunnerError("runners.infer runs sequence-classification checkpoints")
    path = job.input("dataset")
    rows = data.read_records(path)
    text_col, id_col = job.get("text_column", "text"), job.get("id_column", "id")
    texts, _ = data.texts_and_labels(rows, text_col, None, os.path.basename(path))
    model, tok, device = checkpoint.load(ck, task)
    names = checkpoint.label_names(model)
    preds, probs = checkpoint.classify(
        model, tok, device, texts, int(job.get("batch_size", 64)), int(job.get("max_length", 256)),
        on_batch=lambda n: common.progress(records=n, total=len(texts)),
    )
    with open(os.path.join(job.out, "predictions.jsonl"), "w", encoding="utf-8") as f:
        for i, (r, p, pr) in enumerate(zip(rows, preds, probs)):
            rec = {"id": r.get(id_col, i), "text": r[text_col], "label": names[p], "score": round(max(pr), 6)}
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    print(f"labelled {len(rows)} records", flush=True)
