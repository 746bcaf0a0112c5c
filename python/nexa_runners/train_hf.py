"""runners.train, backend hf: fine-tunes (or trains from a config) a transformers model
with `Trainer`, optionally as a peft LoRA adapter, and writes a checkpoint: the
save_pretrained folder, metrics.json (loss curve, held-out metrics, steps, samples/s)
and training_args.json (every argument as resolved)."""
import math
import os
import random
import time

import common
import data
from common import RunnerError

# The seed's HFTrainingConfig defaults.
DEFAULTS = {
    "task": "sequence-classification",
    "text_column": "text",
    "label_column": "label",
    "max_length": 256,
    "batch_size": 16,
    "epochs": 4,
    "grad_accumulation": 1,
    "learning_rate": 2e-5,
    "warmup_ratio": 0.0,
    "weight_decay": 0.0,
    "logging_steps": 10,
    "seed": 42,
    "fp16": False,
    "gradient_checkpointing": False,
    "eval_fraction": 0.1,
    "tokenizer_vocab_size": 2000,
}


def resolved(job) -> dict:
    p = dict(DEFAULTS)
    p.update({k: v for k, v in job.params.items() if v is not None})
    p.setdefault("eval_batch_size", p["batch_size"])
    return p


def load_rows(job, p):
    path = job.input("dataset")
    if path:
        rows = data.read_records(path)
        return rows, {"dataset": os.path.basename(path.rstrip("/")), "dataset_digest": "blake2b:" + data.digest_of(path)}
    name = p["dataset"]
    rows = data.hub_records(name, p.get("dataset_config"), p.get("dataset_split", "train"), job.may_use_network())
    return rows, {"dataset": name + (f"/{p['dataset_config']}" if p.get("dataset_config") else "")}


def split(rows, p):
    order = list(range(len(rows)))
    random.Random(p["seed"]).shuffle(order)
    n_eval = p.get("eval_samples")
    if n_eval is None:
        n_eval = max(1, int(len(rows) * float(p["eval_fraction"]))) if len(rows) > 1 else 0
    n_eval = min(int(n_eval), max(len(rows) - 1, 0))
    held = [rows[i] for i in order[:n_eval]]
    train = [rows[i] for i in order[n_eval:]]
    if p.get("train_samples"):
        train = train[: int(p["train_samples"])]
    if not train:
        raise RunnerError("the dataset has no records to train on")
    return train, held


def train_tokenizer(texts, p, causal: bool):
    """A WordPiece tokenizer made from the data, deterministically: the most frequent
    words (ties broken by the word) plus every character seen, alone and as a '##'
    continuation, so any word splits into known pieces. (tokenizers' own trainers break
    ties in hash order, which would make the same inputs give different models.)"""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    size = int(p["tokenizer_vocab_size"])
    eos = "<|endoftext|>"
    specials = [eos] if causal else ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    unk = eos if causal else "[UNK]"
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words = Counter()
    for t in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t)))
    chars = sorted({c for w in words for c in w})
    vocab = list(specials) + chars + ["##" + c for c in chars]
    seen = set(vocab)
    for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= size:
            break
        if w not in seen:
            vocab.append(w)
            seen.add(w)
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token=unk))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    if causal:
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos,
            model_max_length=int(p["max_length"]),
        )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=int(p["max_length"]),
    )


def build_model(job, p, texts, names, causal: bool):
    """Returns (model, tokenizer, what the base model is)."""
    import transformers

    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForSequenceClassification
    extra = {} if causal else {
        "num_labels": len(names),
        "id2label": {i: n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
    }
    src = job.input("model")
    spec = p.get("model")
    if src or isinstance(spec, str):
        where = src or spec
        try:
            tok = transformers.AutoTokenizer.from_pretrained(p.get("tokenizer") or where)
            model = auto.from_pretrained(where, ignore_mismatched_sizes=not causal, **extra)
        except OSError as e:
            if src:
                raise RunnerError(f"the model input is not a save_pretrained folder: {e}")
            raise common.hub_error("model", spec, e)
        base = spec if isinstance(spec, str) else "input:model"
    else:
        cfg = dict(spec["config"])
        model_type = cfg.pop("model_type")
        if p.get("tokenizer"):
            try:
                tok = transformers.AutoTokenizer.from_pretrained(p["tokenizer"])
            except OSError as e:
                raise common.hub_error("tokenizer", p["tokenizer"], e)
        else:
            tok = train_tokenizer(texts, p, causal)
        cfg.setdefault("vocab_size", len(tok))
        cfg.setdefault("max_position_embeddings", max(int(p["max_length"]), 64))
        if tok.pad_token_id is not None:
            cfg.setdefault("pad_token_id", tok.pad_token_id)
        if causal:
            cfg.setdefault("bos_token_id", tok.bos_token_id)
            cfg.setdefault("eos_token_id", tok.eos_token_id)
        try:
            config = transformers.AutoConfig.for_model(model_type, **cfg, **extra)
        except (ValueError, TypeError) as e:
            raise RunnerError(f"params.model.config: {e}")
        model = auto.from_config(config)
        base = f"config:{model_type}"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
        model.config.pad_token_id = tok.pad_token_id
    return model, tok, base


class Encoded:
    """A list of tokenised records (what Trainer iterates over)."""

    def __init__(self, enc, labels):
        self.enc = enc
        self.labels = labels

    def __len__(self):
        return len(self.enc["input_ids"])

    def __getitem__(self, i):
        item = {k: v[i] for k, v in self.enc.items()}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def main(job) -> None:
    common.require("torch", "transformers", "tokenizers", "safetensors", "accelerate")
    p = resolved(job)
    lora = p.get("lora")
    if lora:
        common.require("peft")
    job.offline()
    import torch
    import transformers

    transformers.set_seed(int(p["seed"]))
    transformers.logging.set_verbosity_error()
    causal = p["task"] == "causal-lm"
    rows, provenance = load_rows(job, p)
    train_rows, held_rows = split(rows, p)
    where = provenance["dataset"]
    train_texts, train_labels = data.texts_and_labels(train_rows, p["text_column"], None if causal else p["label_column"], where)
    held_texts, held_labels = data.texts_and_labels(held_rows, p["text_column"], None if causal else p["label_column"], where)
    names = None
    if not causal:
        ids, names = data.label_ids(train_labels + held_labels)
        if p.get("num_labels"):
            names = [str(i) for i in range(int(p["num_labels"]))] if len(names) < int(p["num_labels"]) else names
        train_ids, held_ids = ids[: len(train_labels)], ids[len(train_labels):]
    model, tok, base = build_model(job, p, train_texts, names, causal)
    if lora:
        import peft

        task_type = peft.TaskType.CAUSAL_LM if causal else peft.TaskType.SEQ_CLS
        lcfg = peft.LoraConfig(
            task_type=task_type, r=int(lora.get("r", 8)), lora_alpha=int(lora.get("alpha", 16)),
            lora_dropout=float(lora.get("dropout", 0.0)), target_modules=lora.get("target_modules"),
        )
        try:
            model = peft.get_peft_model(model, lcfg)
        except ValueError as e:
            raise RunnerError(f"params.lora: {e}")
    max_length = int(p["max_length"])
    enc_train = tok(train_texts, truncation=True, max_length=max_length)
    enc_held = tok(held_texts, truncation=True, max_length=max_length) if held_texts else None
    if causal:
        train_ds, held_ds = Encoded(enc_train, None), Encoded(enc_held, None) if enc_held else None
        collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    else:
        train_ds, held_ds = Encoded(enc_train, train_ids), Encoded(enc_held, held_ids) if enc_held else None
        collator = transformers.DataCollatorWithPadding(tok)
    cuda = torch.cuda.is_available()
    bf16 = p.get("bf16")
    if bf16 is None:
        bf16 = bool(cuda and torch.cuda.is_bf16_supported() and not p["fp16"])
    if bf16 and not (cuda and torch.cuda.is_bf16_supported()):
        bf16 = False
    per_epoch = math.ceil(len(train_ds) / (int(p["batch_size"]) * int(p["grad_accumulation"])))
    total = int(p["max_steps"]) if p.get("max_steps") else per_epoch * int(p["epochs"])
    args = transformers.TrainingArguments(
        output_dir=os.path.join(job.tmp, "trainer"),
        per_device_train_batch_size=int(p["batch_size"]),
        per_device_eval_batch_size=int(p["eval_batch_size"]),
        num_train_epochs=float(p["epochs"]),
        max_steps=int(p["max_steps"]) if p.get("max_steps") else -1,
        gradient_accumulation_steps=int(p["grad_accumulation"]),
        learning_rate=float(p["learning_rate"]),
        warmup_steps=int(float(p["warmup_ratio"]) * total),
        weight_decay=float(p["weight_decay"]),
        logging_steps=int(p["logging_steps"]),
        eval_strategy="steps" if p.get("eval_steps") and held_ds else "no",
        eval_steps=int(p["eval_steps"]) if p.get("eval_steps") else None,
        save_strategy="no",
        seed=int(p["seed"]),
        data_seed=int(p["seed"]),
        fp16=bool(p["fp16"]) and cuda,
        bf16=bool(bf16),
        gradient_checkpointing=bool(p["gradient_checkpointing"]),
        use_cpu=not cuda,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    curve = []

    class Progress(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" in logs:
                curve.append({"step": state.global_step, "loss": logs["loss"], "epoch": logs.get("epoch")})
                common.progress(step=state.global_step, total=state.max_steps, loss=logs["loss"])
            elif "eval_loss" in logs:
                curve.append({"step": state.global_step, "eval_loss": logs["eval_loss"]})

    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=held_ds,
        data_collator=collator, processing_class=tok, callbacks=[Progress()],
    )
    common.progress(step=0, total=total, records=len(train_ds))
    started = time.time()
    result = trainer.train()
    wall = time.time() - started
    held = {}
    if held_ds is not None and len(held_ds):
        if causal:
            out = trainer.evaluate()
            loss = float(out["eval_loss"])
            held = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "samples": len(held_ds)}
        else:
            pred = trainer.predict(held_ds)
            guesses = pred.predictions.argmax(-1).tolist()
            held = common.classification_metrics(guesses, held_ids, names)
    out = job.out
    final = model
    if lora:
        lora_dir = os.path.join(out, "adapter")
        model.save_pretrained(lora_dir)
        final = model.merge_and_unload()
    final.save_pretrained(out)
    tok.save_pretrained(out)
    info = common.device_info()
    metrics = {
        "train_loss": float(result.training_loss),
        "loss_curve": curve,
        "steps": int(result.global_step),
        "train_samples": len(train_ds),
        "samples_per_second": float(result.metrics.get("train_samples_per_second", 0.0)),
        "train_seconds": round(wall, 3),
        "eval": held,
        "base_model": base,
        "task": p["task"],
        "lora": bool(lora),
        "device": "cuda" if info["cuda"] else "cpu",
        "bf16": bool(bf16),
        **provenance,
    }
    common.write_json(os.path.join(out, "metrics.json"), metrics)
    targs = {k: v for k, v in args.to_dict().items() if k not in ("output_dir", "logging_dir", "hub_token")}
    common.write_json(os.path.join(out, "training_args.json"), {"params": p, "trainer": targs, "device": info})
    common.progress(step=int(result.global_step), total=total, loss=float(result.training_loss), done=True)
    acc = held.get("accuracy")
    print(f"trained {base} on {where}: {result.global_step} steps, loss {result.training_loss:.4f}"
          + (f", held-out accuracy {acc:.3f}" if acc is not None else ""), flush=True)
