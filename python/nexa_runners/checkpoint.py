"""Loading a checkpoint folder (a save_pretrained folder; a LoRA run saves its merged
model there and the adapter alone under adapter/) and running it over texts in batches."""
import json
import os

from common import RunnerError


def task_of(path: str, override=None) -> str:
    if override:
        return override
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except OSError:
        cfg = {}
    archs = " ".join(cfg.get("architectures") or [])
    if "CausalLM" in archs or "LMHead" in archs:
        return "causal-lm"
    return "sequence-classification"


def load(path: str, task: str):
    import torch
    import transformers

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise RunnerError(
            f"the checkpoint {path} has no config.json: give a save_pretrained folder "
            "(a runners.train output, or a model saved with save_pretrained)"
        )
    cls = (
        transformers.AutoModelForCausalLM
        if task == "causal-lm"
        else transformers.AutoModelForSequenceClassification
    )
    model = cls.from_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    model.eval()
    return model, tok, device


def label_names(model) -> list:
    id2label = getattr(model.config, "id2label", None) or {}
    n = getattr(model.config, "num_labels", len(id2label) or 2)
    return [str(id2label.get(i, id2label.get(str(i), i))) for i in range(n)]


def classify(model, tok, device, texts, batch_size: int, max_length: int, on_batch=None):
    """Returns (predicted ids, probabilities) for each text."""
    import torch

    preds, probs = [], []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = texts[start:start + batch_size]
            enc = tok(batch, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            logits = model(**enc).logits.float()
            p = torch.softmax(logits, dim=-1)
            preds.extend(p.argmax(dim=-1).tolist())
            probs.extend(p.tolist())
            if on_batch:
                on_batch(start + len(batch))
    return preds, probs


def lm_loss(model, tok, device, texts, batch_size: int, max_length: int):
    """Mean token loss of a causal LM over the texts."""
    import math

    import torch

    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tok(texts[start:start + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            ids = enc["input_ids"].to(device)
            mask = enc["attention_mask"].to(device)
            labels = ids.masked_fill(mask == 0, -100)
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            n = int((labels[:, 1:] != -100).sum())
            total += float(out.loss) * n
            tokens += n
    loss = total / max(tokens, 1)
    return loss, math.exp(min(loss, 50.0))
