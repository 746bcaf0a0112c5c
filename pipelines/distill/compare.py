"""Compares the teacher and the student of pipelines/distill.yaml: their held-out
metrics and their sizes, as comparison.json and report.md (stdlib only)."""
import json
import os


def load(var, name):
    with open(os.path.join(os.environ[var], name), encoding="utf-8") as f:
        return json.load(f)


def params(ckpt_var):
    size = os.path.getsize(os.path.join(os.environ[ckpt_var], "model.safetensors"))
    cfg = load(ckpt_var, "config.json")
    return size, cfg.get("hidden_size"), cfg.get("num_hidden_layers")


def main():
    rows = {}
    for who in ("teacher", "student"):
        report = load(f"NEXA_IN_{who.upper()}", "eval_report.json")
        size, hidden, layers = params(f"NEXA_IN_{who.upper()}_CKPT")
        rows[who] = {k: report[k] for k in ("accuracy", "precision", "recall", "f1", "samples")}
        rows[who].update({"weights_bytes": size, "hidden_size": hidden, "layers": layers})
    t, s = rows["teacher"], rows["student"]
    rows["student_vs_teacher"] = {
        "accuracy_ratio": s["accuracy"] / t["accuracy"] if t["accuracy"] else None,
        "size_ratio": s["weights_bytes"] / t["weights_bytes"],
    }
    out = os.environ["NEXA_OUT"]
    with open(os.path.join(out, "comparison.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2, sort_keys=True)
    lines = ["# Distillation: teacher vs student", "",
             "| model | accuracy | f1 | weights | hidden x layers |", "|---|---|---|---|---|"]
    for who in ("teacher", "student"):
        r = rows[who]
        lines.append(f"| {who} | {r['accuracy']:.3f} | {r['f1']:.3f} | {r['weights_bytes'] / 1024:.0f} KiB | {r['hidden_size']} x {r['layers']} |")
    v = rows["student_vs_teacher"]
    lines += ["", f"The student keeps {v['accuracy_ratio']:.1%} of the teacher's accuracy at {v['size_ratio']:.1%} of its size."]
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
