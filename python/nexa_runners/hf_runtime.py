"""Nexa's own OpenAI-compatible server over transformers (backend hf_runtime):
GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (vLLM's
response and error shapes) and, for a sequence-classification checkpoint,
POST /v1/classify. Standard library HTTP; one model per process.

    python hf_runtime.py --model DIR --name NAME --host H --port P [--port-file F]

With --port 0 the kernel picks a free port, written to --port-file once listening."""
import argparse
import json
import os
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checkpoint  # noqa: E402

LOCK = threading.Lock()


def error(status: int, message: str, kind: str, param=None):
    return status, {"error": {"message": message, "type": kind, "param": param, "code": status}}


class Model:
    def __init__(self, path: str, name: str):
        self.name = name
        self.task = checkpoint.task_of(path)
        self.model, self.tok, self.device = checkpoint.load(path, self.task)
        self.created = int(time.time())

    def complete(self, prompt: str, max_tokens: int, temperature: float):
        import torch

        enc = self.tok(prompt, return_tensors="pt").to(self.device)
        kw = {"max_new_tokens": max_tokens, "pad_token_id": self.tok.pad_token_id}
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature)
        else:
            kw.update(do_sample=False)
        with LOCK, torch.no_grad():
            out = self.model.generate(**enc, **kw)
        new = out[0][enc["input_ids"].shape[1]:]
        text = self.tok.decode(new, skip_special_tokens=True)
        finish = "length" if len(new) >= max_tokens else "stop"
        return text, int(enc["input_ids"].shape[1]), int(len(new)), finish

    def classify(self, texts):
        with LOCK:
            preds, probs = checkpoint.classify(self.model, self.tok, self.device, texts, 32, 512)
        names = checkpoint.label_names(self.model)
        return [{"index": i, "label": names[p], "score": max(pr)} for i, (p, pr) in enumerate(zip(preds, probs))]


def handle(model: Model, method: str, path: str, body: dict):
    if method == "GET" and path == "/health":
        return 200, None
    if method == "GET" and path == "/v1/models":
        return 200, {"object": "list", "data": [
            {"id": model.name, "object": "model", "created": model.created, "owned_by": "nexa", "task": model.task}]}
    if method != "POST" or path not in ("/v1/completions", "/v1/chat/completions", "/v1/classify"):
        return error(404, f"no route {method} {path}", "NotFoundError")
    name = body.get("model", model.name)
    if name != model.name:
        return error(404, f"The model `{name}` does not exist.", "NotFoundError", "model")
    if path == "/v1/classify":
        if model.task != "sequence-classification":
            return error(400, "this model is a causal LM: use /v1/completions", "BadRequestError", "model")
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
            return error(400, "'input' must be a string or a list of strings", "BadRequestError", "input")
        return 200, {"object": "list", "model": model.name, "data": model.classify(inputs)}
    if model.task != "causal-lm":
        return error(400, "this model is a sequence classifier: use /v1/classify", "BadRequestError", "model")
    try:
        max_tokens = int(body.get("max_tokens", 16))
        temperature = float(body.get("temperature", 0.0))
    except (TypeError, ValueError):
        return error(400, "max_tokens and temperature must be numbers", "BadRequestError")
    if max_tokens < 1:
        return error(400, "max_tokens must be at least 1", "BadRequestError", "max_tokens")
    created = int(time.time())
    if path == "/v1/chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return error(400, "'messages' must be a non-empty list", "BadRequestError", "messages")
        if getattr(model.tok, "chat_template", None):
            prompt = model.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            prompt = "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages) + "\nassistant:"
        text, p, c, finish = model.complete(prompt, max_tokens, temperature)
        return 200, {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created,
                     "model": model.name,
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                     "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}
    prompts = body.get("prompt")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(t, str) for t in prompts):
        return error(400, "'prompt' must be a string or a list of strings", "BadRequestError", "prompt")
    choices, pt, ct = [], 0, 0
    for i, prompt in enumerate(prompts):
        text, p, c, finish = model.complete(prompt, max_tokens, temperature)
        choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish})
        pt, ct = pt + p, ct + c
    return 200, {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created,
                 "model": model.name, "choices": choices,
                 "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}}


def server(model: Model, host: str, port: int):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            sys.stderr.write("hf_runtime: " + (fmt % args) + "\n")

        def respond(self, status, payload):
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            if payload is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.respond(*handle(model, "GET", self.path, {}))

        def do_POST(self):
            try:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}") if n <= 1 << 20 else None
            except (ValueError, json.JSONDecodeError):
                body = None
            if not isinstance(body, dict):
                self.respond(*error(400, "the body must be a JSON object (at most 1 MiB)", "BadRequestError"))
                return
            try:
                self.respond(*handle(model, "POST", self.path, body))
            except Exception as e:  # noqa: BLE001 - a failed request must not kill the server
                self.respond(*error(500, f"{type(e).__name__}: {e}", "InternalServerError"))

    return ThreadingHTTPServer((host, port), Handler)


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--model", required=True)
    a.add_argument("--name", required=True)
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, default=8000)
    a.add_argument("--port-file")
    args = a.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    model = Model(args.model, args.name)
    httpd = server(model, args.host, args.port)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=httpd.shutdown, daemon=True).start())
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(httpd.server_address[1]))
        os.replace(tmp, args.port_file)
    print(f"hf_runtime: serving {args.name} ({model.task}) on http://{args.host}:{httpd.server_address[1]}", file=sys.stderr, flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
