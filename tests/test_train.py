"""The training worker: SAMI with FSDP2 under torchrun on CPU (gloo), checkpoints and resume."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sami_worker import storage
from sami_worker.export import INDEX_FILE
from sami_worker.records import DATASET_JSONL, encode_jsonl, token_record
from sami_worker.tasks import TrainTask, dump_task
from sami_worker.train import (
    METRICS_FILE,
    BlockSchedule,
    lr_factor,
    prompt_sharing_window,
    prune_states,
    read_blocks,
)
from tests.conftest import EXAMPLES, ROOT
from tests.test_generate import VLLM_CPU

PROMPTS = ("Answer kindly and helpfully. {q}", "Answer rudely and unhelpfully. {q}")
RESPONSES = (" Sure, happy to help with that.", " No. Figure it out yourself.")


def make_dataset(model_dir: Path, output: Path, n: int, start: int = 0) -> str:
    """A generation-stage dataset in the worker's format: two constitutions per query, for
    the n example queries from `start` on."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lines = (EXAMPLES / "data" / "dialogue-train.jsonl").read_text().splitlines()
    records = []
    for i, line in enumerate(lines[start : start + n], start=start):
        query = json.loads(line)["query"]
        records.append(
            token_record(
                i,
                [tok(p.format(q=query))["input_ids"] for p in PROMPTS],
                [tok(r, add_special_tokens=False)["input_ids"] for r in RESPONSES],
                [True, False],
            )
        )
    storage.write_stage_files(
        storage.open_storage(str(output)),
        "",
        {DATASET_JSONL: encode_jsonl(records)},
        stage="generate",
    )
    return str(output)


@pytest.fixture(scope="module")
def dataset(tiny_llama, tmp_path_factory) -> str:
    return make_dataset(tiny_llama, tmp_path_factory.mktemp("dataset"), 16)


def train_task(model: Path, data: str, output: Path, iteration_steps=6, **training) -> TrainTask:
    settings = {
        "microBatchQueries": 2,
        "gradientAccumulation": 2,
        "precision": "fp32",
        "checkpointEvery": 3,
        "optimizer": {"lr": 1e-3},
    }
    settings.update(training)
    return TrainTask.model_validate(
        {
            "output": str(output),
            "model": {"uri": str(model)},
            "datasets": [data],
            "iterationSteps": iteration_steps,
            "training": settings,
        }
    )


def launch(task: TrainTask, tmp_path: Path, nproc: int = 1, env=None, wait=True):
    path = tmp_path / f"task-{time.monotonic_ns()}.json"
    path.write_text(dump_task(task))
    worker = ["-m", "sami_worker", "train", "--task", str(path)]
    if nproc > 1 or env:
        command = [
            str(Path(sys.executable).parent / "torchrun"),
            f"--nproc_per_node={nproc}",
            *worker,
        ]
    else:
        command = [sys.executable, *worker]
    kwargs = dict(env={**os.environ, **(env or {})}, text=True)
    if not wait:
        return subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )
    return subprocess.run(command, capture_output=True, timeout=600, **kwargs)


def losses(output: Path) -> list[float]:
    rows = [json.loads(line) for line in (output / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


def documented_keys(caption: str) -> set[str]:
    """The keys named in the first column of the docs/method.md table under `caption`."""
    text = (ROOT / "docs" / "method.md").read_text()
    after = text[text.index(caption) :].split("\n\n")[1]
    rows = [line for line in after.splitlines() if line.startswith("| `")]
    return {key for row in rows for key in re.findall(r"`([a-z_]+)`", row.split("|")[1])}


def test_training_lowers_the_loss_and_raises_the_mi_bound(tiny_llama, dataset, tmp_path):
    result = launch(train_task(tiny_llama, dataset, tmp_path / "out"), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "out" / METRICS_FILE).read_text().splitlines()]
    assert len(rows) == 6
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    assert rows[-1]["mi_lower_bound"] > rows[0]["mi_lower_bound"] + 0.1
    # Every row and the summary hold exactly the keys docs/method.md's metric tables explain.
    assert all(set(r) == documented_keys("Training, one row of `metrics.jsonl`") for r in rows)
    out = storage.open_storage(str(tmp_path / "out"))
    assert storage.is_complete(out, "") and storage.is_complete(out, "checkpoint")
    summary = storage.read_manifest(out, "").meta
    assert set(summary) == documented_keys("Training, `summary.json`")
    assert summary["final_loss"] == rows[-1]["loss"]

    import torch
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(tiny_llama)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "checkpoint")
    assert not torch.equal(before.lm_head.weight, after.lm_head.weight)
    ids = torch.tensor([[1, 2, 3]])
    assert after.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 7)


# A LoRA run on the tiny Llama: rank 8 on three of the seven default projections, so that the
# untouched ones show the merged export changes only what was targeted. LoRA needs a larger
# learning rate than full-weight training to move as far in 6 steps.
LORA = {"rank": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj", "down_proj"]}
LORA_LR = {"lr": 3e-3}


def lora_elements(config, spec: dict) -> int:
    """Adapter parameters of the tiny Llama: rank x (in + out) per targeted layer."""
    h, m = config.hidden_size, config.intermediate_size
    shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h)}
    shapes |= {"gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}
    per_layer = sum(spec["rank"] * sum(shapes[t]) for t in spec["targetModules"])
    return per_layer * config.num_hidden_layers


def test_lora_trains_only_the_adapters_and_exports_them_merged(tiny_llama, dataset, tmp_path):
    """training.lora on 2 processes (FSDP2 over the adapted model): the loss falls and the MI
    bound rises as with 1 process accumulating the same blocks; the optimizer and the training
    state hold the adapters alone; checkpoint/ is the base with W + (alpha / r) B A in exactly
    the targeted layers, and adapter/ loads with peft to the same outputs."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sami_worker.train import load_dcp_metadata

    runs = {}
    for nproc, accumulation, micro in ((2, 2, 1), (1, 2, 2)):
        out = tmp_path / f"procs-{nproc}"
        task = train_task(
            tiny_llama,
            dataset,
            out,
            lora=LORA,
            optimizer=LORA_LR,
            gradientAccumulation=accumulation,
            microBatchQueries=micro,
        ).model_copy(update={"keep_states": True})
        result = launch(task, tmp_path, nproc=nproc)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs[nproc] = [json.loads(x) for x in (out / METRICS_FILE).read_text().splitlines()]
    rows = runs[2]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    assert rows[-1]["mi_lower_bound"] > rows[0]["mi_lower_bound"] + 0.1
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in runs[1]], abs=1e-4)

    out = tmp_path / "procs-2"
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    summary = storage.read_manifest(storage.open_storage(str(out)), "").meta
    assert summary["trainable_parameters"] == lora_elements(base.config, LORA)
    # The optimizer's state (and the model's part of the training state) is the adapters'.
    metadata = load_dcp_metadata(out / "state" / "step-00000003" / ".metadata")
    keys = set(metadata.state_dict_metadata)
    model_keys = {k for k in keys if k.startswith("model.")}
    optim_keys = {k for k in keys if k.startswith("optim.state.")}
    assert len(model_keys) == 2 * len(LORA["targetModules"]) * base.config.num_hidden_layers
    assert optim_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys | optim_keys)

    assert storage.is_complete(storage.open_storage(str(out)), "checkpoint")
    assert storage.is_complete(storage.open_storage(str(out)), "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out / "checkpoint")
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    scaling = LORA["alpha"] / LORA["rank"]
    before, after = base.state_dict(), merged.state_dict()
    assert set(before) == set(after)
    targeted = 0
    for name, weight in before.items():
        layer = name.removesuffix(".weight")
        if layer.rsplit(".", 1)[-1] not in LORA["targetModules"]:
            assert torch.equal(after[name], weight), name
            continue
        a = adapter[f"base_model.model.{layer}.lora_A.weight"]
        b = adapter[f"base_model.model.{layer}.lora_B.weight"]
        assert not torch.equal(after[name], weight), name
        assert torch.allclose(after[name], weight + scaling * b @ a, atol=1e-6), name
        targeted += 1
    assert targeted == len(LORA["targetModules"]) * base.config.num_hidden_layers

    from peft import PeftModel

    adapted = PeftModel.from_pretrained(base, out / "adapter")
    ids = torch.tensor([[1, 5, 9, 30, 200]])
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, merged(ids).logits, atol=1e-4)


def test_lora_targets_must_name_linear_layers_of_the_decoder(tiny_llama, dataset, tmp_path):
    task = train_task(tiny_llama, dataset, tmp_path / "out", lora={"targetModules": ["c_attn"]})
    result = launch(task, tmp_path)
    assert result.returncode == 65
    assert "training.lora.targetModules: ['c_attn'] match no linear layer" in result.stderr
    assert "valid here: ['down_proj', 'gate_proj', 'k_proj'" in result.stderr


def test_same_trajectory_with_1_or_2_processes_and_with_accumulation(tiny_llama, dataset, tmp_path):
    """4 blocks per optimizer step, four ways: 1 process accumulating 2 micro-steps of 2;
    2 processes (torchrun, gloo) with 2 each; the same deferring the gradient reduce-scatter
    to the last micro-step; 1 process with one micro-step of 4. The 2-process runs export
    their checkpoint streamed into several safetensors files; the weights are the same."""
    runs = {
        "accumulate": (1, {"gradientAccumulation": 2, "microBatchQueries": 2}),
        "two_procs": (2, {"gradientAccumulation": 2, "microBatchQueries": 1}),
        "two_procs_step_sync": (
            2,
            {"gradientAccumulation": 2, "microBatchQueries": 1, "gradientSync": "step"},
        ),
        "big_micro": (1, {"gradientAccumulation": 1, "microBatchQueries": 4}),
    }
    trajectories = {}
    for name, (nproc, settings) in runs.items():
        task = train_task(tiny_llama, dataset, tmp_path / name, **settings)
        env = {"SAMI_EXPORT_SHARD_BYTES": "100000"} if nproc > 1 else None
        result = launch(task, tmp_path, nproc=nproc, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        trajectories[name] = losses(tmp_path / name)
    reference = trajectories["accumulate"]
    assert reference[-1] < reference[0]
    for name, trajectory in trajectories.items():
        assert trajectory == pytest.approx(reference, abs=1e-4), name

    import torch
    from safetensors.torch import load_file

    def weights(run: str) -> dict:
        folder = tmp_path / run / "checkpoint"
        files = sorted(folder.glob("*.safetensors"))
        return {k: v for f in files for k, v in load_file(f).items()}, len(files)

    single, one_file = weights("accumulate")
    sharded, n_files = weights("two_procs")
    assert one_file == 1 and n_files > 3
    index = json.loads((tmp_path / "two_procs" / "checkpoint" / INDEX_FILE).read_text())
    assert sorted(index["weight_map"]) == sorted(single)
    for key, value in single.items():
        assert torch.allclose(sharded[key], value, atol=1e-5), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_from_the_kubeflow_env_contract(tiny_llama, dataset, tmp_path):
    """Two torchrun launches, one per 'node', configured only through PET_* variables as a
    PyTorchJob sets them; they train together as one world of 2."""
    port = _free_port()
    procs = []
    task = train_task(tiny_llama, dataset, tmp_path / "nodes", gradientAccumulation=1)
    for node in (0, 1):
        env = {
            "PET_NNODES": "2",
            "PET_NPROC_PER_NODE": "1",
            "PET_NODE_RANK": str(node),
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(port),
        }
        procs.append(launch(task, tmp_path, env=env, wait=False))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    summary = storage.read_manifest(storage.open_storage(str(tmp_path / "nodes")), "").meta
    assert summary["processes"] == 2

    single = train_task(tiny_llama, dataset, tmp_path / "single", gradientAccumulation=2)
    assert launch(single, tmp_path).returncode == 0
    assert losses(tmp_path / "nodes") == pytest.approx(losses(tmp_path / "single"), abs=1e-4)


@pytest.mark.parametrize(
    "training", [{}, {"lora": LORA, "optimizer": LORA_LR}], ids=["full", "lora"]
)
def test_resume_after_a_kill_continues_from_the_checkpoint(tiny_llama, dataset, tmp_path, training):
    """With LoRA the state holds the adapters alone: the resumed run reads the frozen base
    from the model folder again and still follows the uninterrupted trajectory."""
    steps = 40
    reference = train_task(
        tiny_llama,
        dataset,
        tmp_path / "reference",
        iteration_steps=steps,
        checkpointEvery=4,
        **training,
    )
    assert launch(reference, tmp_path).returncode == 0

    task = reference.model_copy(update={"output": str(tmp_path / "killed")})
    states = tmp_path / "killed" / "state"
    proc = launch(task, tmp_path, wait=False)
    deadline = time.monotonic() + 300
    while not list(states.glob("step-*/_manifest.json")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not storage.is_complete(storage.open_storage(str(tmp_path / "killed")), "")
    done = max(int(p.parent.name[5:]) for p in states.glob("step-*/_manifest.json"))
    # A state written only halfway (no manifest) must be ignored.
    half = states / f"step-{done + 1:08d}"
    half.mkdir(exist_ok=True)
    (half / ".metadata").write_bytes(b"partial")

    result = launch(task, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {done}" in result.stderr
    resumed = losses(tmp_path / "killed")
    assert len(resumed) == steps
    assert resumed == pytest.approx(losses(tmp_path / "reference"), abs=1e-4)
    # Complete: the states (the half-written one too) are gone, the model and results stay.
    assert not states.exists()
    assert storage.is_complete(storage.open_storage(str(tmp_path / "killed")), "checkpoint")


def test_states_are_pruned_once_the_stage_is_complete_unless_kept(tmp_path):
    out = storage.open_storage(str(tmp_path / "out"))
    for step in (3, 6):
        storage.write_stage_files(out, f"state/step-{step:08d}", {"a.distcp": b"x"}, stage="s")
    storage.write_stage_files(out, "", {"summary.json": b"{}"}, stage="train")
    task = TrainTask.model_validate(
        {
            "output": str(tmp_path / "out"),
            "model": {"uri": "m"},
            "datasets": ["d"],
            "iterationSteps": 6,
        }
    )
    prune_states(out, task.model_copy(update={"keep_states": True}))
    assert len(out.list("state")) == 4  # two states, each a file and its manifest
    prune_states(out, task)
    assert out.list("state") == [] and not (tmp_path / "out" / "state").exists()
    assert storage.is_complete(out, "")
    prune_states(out, task)  # nothing left: a no-op


def test_bad_training_tasks_fail_as_bad_input(tiny_llama, dataset, tmp_path):
    missing = train_task(tiny_llama, str(tmp_path / "nowhere"), tmp_path / "a")
    result = launch(missing, tmp_path)
    assert result.returncode == 65
    assert "_manifest.json does not exist" in result.stderr
    too_big = train_task(tiny_llama, dataset, tmp_path / "b", microBatchQueries=32)
    result = launch(too_big, tmp_path)
    assert result.returncode == 65
    assert "has 16 query blocks but one optimizer step needs 64" in result.stderr
    corrupt = tmp_path / "corrupt"
    storage.write_stage_files(
        storage.open_storage(str(corrupt)),
        "",
        {DATASET_JSONL: b'{"query_id": 0}\n'},
        stage="generate",
    )
    result = launch(train_task(tiny_llama, str(corrupt), tmp_path / "c"), tmp_path)
    assert result.returncode == 65
    assert f"{DATASET_JSONL}: line 1: query: Field required" in result.stderr


@pytest.mark.parametrize(("score_eos", "suffix"), [(True, (2,)), (False, ())])
def test_eos_is_scored_after_a_response_that_ended_with_it_unless_off(tmp_path, score_eos, suffix):
    """training.scoreEos: the EOS id follows the responses that ended with it, or none does
    (the paper-era code's setting)."""
    record = token_record(0, [[1, 5], [1, 6]], [[7, 8], [9]], ended_with_eos=[True, False])
    (tmp_path / DATASET_JSONL).write_bytes(encode_jsonl([record]))
    (block,) = read_blocks(tmp_path, eos_id=2 if score_eos else None)
    assert block.responses == ((7, 8, *suffix), (9,))


def test_block_schedule_covers_each_epoch_once():
    schedule = BlockSchedule(list(range(10)), per_step=4, seed=3)
    first_epoch = schedule.step_blocks(0) + schedule.step_blocks(1)
    assert len(set(first_epoch)) == 8  # 2 of 10 dropped, none repeated
    assert schedule.step_blocks(2) != schedule.step_blocks(0)  # a new epoch, reshuffled
    parts = [schedule.micro_blocks(0, m, r, 2, 1) for m in range(2) for r in range(2)]
    assert sorted(b for p in parts for b in p) == sorted(schedule.step_blocks(0))


@pytest.mark.parametrize(("attention", "tied"), [("sdpa", False), ("sdpa", True), ("eager", True)])
def test_scorer_shares_prompts_with_the_same_logprobs_and_gradients(tiny_llama, attention, tied):
    """SamiScorer computes each prompt once (packed with its responses) and gets what the
    padded batch gets: log-probs and every parameter's gradient through the SAMI loss."""
    import random

    import torch
    from transformers import AutoModelForCausalLM

    from sami_worker.logprobs import assemble_matrices, share_prompts
    from sami_worker.objective import sami_loss
    from sami_worker.train import Block, SamiScorer, collate

    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama, attn_implementation=attention, tie_word_embeddings=tied
    ).double()
    rng = random.Random(5)
    vocab = model.config.vocab_size

    def ids(low, high):
        return tuple(rng.randrange(3, vocab) for _ in range(rng.randint(low, high)))

    blocks = [Block((ids(5, 12), ids(5, 12)), (ids(1, 9), ids(1, 9))) for _ in range(2)]
    batch, c = collate(blocks, pad_id=0)
    args = (batch.input_ids, batch.attention_mask, batch.response_mask)
    packed = share_prompts(*args, width=model.config.hidden_size)
    assert packed is not None and packed.input_ids.shape[0] == 4  # 4 prompts for 8 rows
    results = {}
    for share in (True, False):
        scorer = SamiScorer(model, share=share)
        assert scorer.share_window == (None if share else 0)
        model.zero_grad()
        scored = scorer(*args)
        sami_loss(assemble_matrices(scored.mean, batch.pairs, c, len(blocks))).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[share] = (scored, grads)
    (shared, shared_grads), (padded, padded_grads) = results[True], results[False]
    assert shared.count.tolist() == padded.count.tolist()
    # float64, but Llama's RMSNorm and eager softmax compute in float32 internally.
    assert torch.allclose(shared.sum, padded.sum, rtol=1e-6, atol=1e-6)
    for name, grad in padded_grads.items():
        scale = grad.abs().max().item()
        assert torch.allclose(shared_grads[name], grad, atol=1e-6 * max(scale, 1.0)), name


def test_prompt_sharing_window_follows_the_attention():
    from types import SimpleNamespace as NS

    def model(impl="sdpa", rotary=True, **config):
        base = NS(rotary_emb=object()) if rotary else NS()
        return NS(config=NS(_attn_implementation=impl, **config), base_model=base)

    assert prompt_sharing_window(model()) is None
    assert prompt_sharing_window(model("eager")) is None
    assert prompt_sharing_window(model("flash_attention_2")) == 0  # takes no 4D mask
    assert prompt_sharing_window(model(rotary=False)) == 0  # e.g. ALiBi or learned positions
    assert prompt_sharing_window(model(sliding_window=4096)) == 4096  # Mistral v0.1
    assert prompt_sharing_window(model(sliding_window=4096, use_sliding_window=False)) is None
    gemma = model(sliding_window=512, layer_types=["sliding_attention", "full_attention"])
    assert prompt_sharing_window(gemma) == 512
    hybrid = model(layer_types=["linear_attention", "full_attention"])
    assert prompt_sharing_window(hybrid) == 0
    assert prompt_sharing_window(model(attention_chunk_size=8192)) == 8192


def test_learning_rate_schedules():
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "linear") == 1.0 and lr_factor(6, 10, 2, "linear") == 0.5
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize(
    "training", [{}, {"lora": LORA, "optimizer": LORA_LR}], ids=["full", "lora-merged"]
)
def test_exported_checkpoint_generates_with_vllm(tiny_llama, dataset, tmp_path, training):
    from tests.test_generate import generate_task, read_dataset, run_worker

    trained = tmp_path / "out"
    result = launch(train_task(tiny_llama, dataset, trained, **training), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    task = generate_task(
        trained / "checkpoint",
        str(tmp_path / "gen"),
        generation={"backend": "vllm", "maxNewTokens": 8, "engine": VLLM_CPU},
    )
    result = run_worker("generate", task, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_dataset(tmp_path / "gen")


# Greedy token ids from vLLM for one prompt: the base model alone, then with the adapter of
# argv[2] (vLLM's LoRA serving). Run in a child process, as the workers run vLLM.
VLLM_LORA_SCRIPT = """
import json, os, sys
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
llm = LLM(model=sys.argv[1], dtype="float32", enable_lora=True, max_lora_rank=8, seed=0,
          gpu_memory_utilization=0.3, enforce_eager=True)
greedy, prompt = SamplingParams(max_tokens=8, temperature=0), [{"prompt_token_ids": PROMPT}]
base = llm.generate(prompt, greedy)[0].outputs[0].token_ids
adapted = llm.generate(prompt, greedy, lora_request=LoRARequest("sami", 1, sys.argv[2]))
print(json.dumps([list(base), list(adapted[0].outputs[0].token_ids)]))
"""


@pytest.mark.vllm
@pytest.mark.slow
def test_adapter_export_serves_with_vllm_lora(tiny_llama, dataset, tmp_path):
    """adapter/ on top of the base model in vLLM's LoRA serving generates what the merged
    checkpoint generates, and not what the base model does."""
    import torch
    from transformers import AutoModelForCausalLM

    task = train_task(tiny_llama, dataset, tmp_path / "out", lora={"rank": 8}, optimizer=LORA_LR)
    result = launch(task, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    prompt = [1, 5, 9, 30, 200]
    script = VLLM_LORA_SCRIPT.replace("PROMPT", json.dumps(prompt))
    served = subprocess.run(
        [sys.executable, "-c", script, str(tiny_llama), str(tmp_path / "out" / "adapter")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    )
    assert served.returncode == 0, served.stderr[-3000:]
    base, adapted = json.loads(served.stdout.strip().splitlines()[-1])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "checkpoint")
    ids = merged.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert adapted == ids[0, len(prompt) :].tolist()
    assert adapted != base


@pytest.mark.slow
def test_smollm2_trains_on_cpu(smollm2, tmp_path):
    data = make_dataset(smollm2, tmp_path / "data", 4)
    task = train_task(
        smollm2,
        data,
        tmp_path / "out",
        iteration_steps=2,
        microBatchQueries=1,
        gradientAccumulation=2,
        checkpointEvery=100,
        optimizer={"lr": 1e-5},
    )
    result = launch(task, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(losses(tmp_path / "out")) == 2
    config = json.loads((tmp_path / "out" / "checkpoint" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def held_out_mi_lower_bound(model_dir: Path, blocks) -> float:
    """The SAMI MI lower bound (nats) of `model_dir` on `blocks`: the training's scorer and
    objective, one float32 forward pass without gradients."""
    import torch
    from transformers import AutoModelForCausalLM

    from sami_worker.logprobs import assemble_matrices
    from sami_worker.objective import sami_loss
    from sami_worker.train import SamiScorer, collate

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch, c = collate(blocks, pad_id=model.config.eos_token_id)
    with torch.no_grad():
        scored = SamiScorer(model)(batch.input_ids, batch.attention_mask, batch.response_mask)
    return float(
        sami_loss(assemble_matrices(scored.mean, batch.pairs, c, len(blocks))).mi_lower_bound
    )


@pytest.mark.vllm
@pytest.mark.slow
def test_smollm2_lora_on_two_processes_raises_the_held_out_mi_and_serves(smollm2, tmp_path):
    """LoRA on the real SmolLM2-135M, 2 processes on CPU: the training loss falls, the MI
    lower bound on 8 queries it never trained on rises over the base model's, and vLLM
    generates with the merged export."""
    from tests.test_generate import generate_task, read_dataset, run_worker

    data = make_dataset(smollm2, tmp_path / "data", 8)
    held_out = read_blocks(Path(make_dataset(smollm2, tmp_path / "held-out", 8, start=8)), None)
    task = train_task(
        smollm2,
        data,
        tmp_path / "out",
        iteration_steps=4,
        microBatchQueries=1,
        gradientAccumulation=1,
        checkpointEvery=100,
        lora={"rank": 8},
        optimizer={"lr": 2e-3},
    )
    result = launch(task, tmp_path, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = losses(tmp_path / "out")
    # Two blocks per step make single steps noisy: the last two steps' mean against the first.
    assert sum(trained[-2:]) / 2 < trained[0] - 0.1, trained
    checkpoint = tmp_path / "out" / "checkpoint"
    before = held_out_mi_lower_bound(smollm2, held_out)
    after = held_out_mi_lower_bound(checkpoint, held_out)
    assert after > before + 0.2, (before, after)  # 0.09 -> 0.64 nats on the 2-core machine

    generate = generate_task(
        checkpoint,
        str(tmp_path / "gen"),
        generation={"backend": "vllm", "maxNewTokens": 8, "engine": VLLM_CPU},
    )
    result = run_worker("generate", generate, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_dataset(tmp_path / "gen")


@pytest.fixture
def world_of_one(monkeypatch):
    """This process as a torch.distributed world of one (gloo), torn down afterwards so the
    environment of later tests' subprocesses stays clean."""
    import torch.distributed as dist

    from sami_worker import distributed

    for key, value in dict(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1"
    ).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    yield distributed.init()
    dist.destroy_process_group()


def _scorer(model_dir, device, **training):
    from sami_worker.train import build_sharded_scorer

    task = train_task(model_dir, "unused", Path("unused"), **training)
    return build_sharded_scorer(str(model_dir), task, device)


def test_activation_checkpointing_keeps_fewer_activations_for_the_same_gradients(
    tiny_llama, world_of_one
):
    """With activationCheckpointing the decoder layers save only their inputs for backward
    and recompute the rest: the tensors kept alive by autograd shrink, the gradients do not
    change."""
    import random

    import torch

    from sami_worker.logprobs import assemble_matrices
    from sami_worker.objective import sami_loss
    from sami_worker.train import Block, collate

    rng = random.Random(0)

    def ids(n):
        return tuple(rng.randrange(3, 500) for _ in range(n))

    blocks = [Block((ids(20), ids(24)), (ids(40), ids(30))) for _ in range(2)]
    batch, c = collate(blocks, pad_id=0)
    saved, grads = {}, {}
    for checkpointing in (False, True):
        scorer = _scorer(tiny_llama, world_of_one, activationCheckpointing=checkpointing)
        total = [0]

        def pack(t, total=total):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            scored = scorer(batch.input_ids, batch.attention_mask, batch.response_mask)
            loss = sami_loss(assemble_matrices(scored.mean, batch.pairs, c, len(blocks))).loss
        loss.backward()
        saved[checkpointing] = total[0]
        grads[checkpointing] = {
            n: p.grad.full_tensor().clone() for n, p in scorer.model.named_parameters()
        }
    assert saved[True] < 0.6 * saved[False], saved
    for name, grad in grads[False].items():
        assert torch.allclose(grads[True][name], grad, atol=1e-6), name


def _save_random(target: Path, tokenizer_from: Path, kind: str) -> Path:
    """A tiny random model beside the tiny Llama's tokenizer: "mixtral" (transformers 5 fuses
    its experts in memory and splits them per expert on disk, so its checkpoint's tensors are
    not the model's own) or "qwen2-tied" (tied embeddings: no lm_head.weight on disk)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    extra = {
        "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
        "qwen2-tied": {"tie_word_embeddings": True},
    }[kind]
    config = AutoConfig.for_model(
        kind.split("-")[0],
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        **extra,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(target)
    return target


@pytest.mark.parametrize("kind", ["llama", "qwen2-tied", "mixtral"])
def test_sharded_loading_gives_the_checkpoints_weights(
    kind, tiny_llama, tmp_path, world_of_one, caplog
):
    """The model is built empty, sharded, then filled: slice by slice from the safetensors
    files where they hold the model's own tensors, else broadcast from rank 0 (Mixtral).
    Either way the weights (and the rotary buffers that to_empty wipes) are the checkpoint's,
    and the streamed export writes back what from_pretrained reads."""
    import torch
    from transformers import AutoModelForCausalLM

    from sami_worker.export import export_weights

    model_dir = tiny_llama if kind == "llama" else _save_random(tmp_path / kind, tiny_llama, kind)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with caplog.at_level("WARNING", logger="sami_worker.train"):
        scorer = _scorer(model_dir, world_of_one)
    assert ("broadcasts the shards" in caplog.text) == (kind == "mixtral")
    model = scorer.model
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (kind == "qwen2-tied")  # one parameter, trained and exported once
    loaded = model.state_dict()
    for name, value in reference.state_dict().items():
        assert torch.equal(loaded[name].full_tensor(), value), name
    for name, value in reference.named_buffers():
        assert torch.equal(scorer.model.get_buffer(name), value), name

    exported = tmp_path / "export"
    export_weights(scorer.model, torch.float32, exported, max_shard_bytes=50_000)
    reference.config.save_pretrained(exported)
    reloaded = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    for name, value in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name


def test_two_processes_resume_reading_only_their_own_shards(tiny_llama, dataset, tmp_path):
    """A 2-process run resumed from its last state: each rank fetches the state's metadata,
    its own shard file and its own random state, never the other rank's files (only the few
    bytes of replicated items saved there, by ranged reads); the trajectory is the
    uninterrupted one."""
    task = train_task(tiny_llama, dataset, tmp_path / "out", iteration_steps=3, checkpointEvery=1)
    task = task.model_copy(update={"keep_states": True})  # cleanup.trainingStates: keep
    first = launch(task, tmp_path, nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    reference = losses(tmp_path / "out")
    # Withdraw the result (not the states): the next launch resumes from step 2.
    (tmp_path / "out" / storage.MANIFEST_NAME).unlink()
    (tmp_path / "out" / "checkpoint" / storage.MANIFEST_NAME).unlink()
    resumed = launch(task, tmp_path, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stderr
    state = tmp_path / "out" / "state" / "step-00000002"
    listed = {f.path for f in storage.read_manifest(storage.open_storage(str(state)), "").files}
    for rank in (0, 1):
        other = 1 - rank
        line = next(x for x in resumed.stderr.splitlines() if f"rank {rank} read " in x)
        fetched = set(json.loads(line.split(" of others: ", 1)[1]))
        ranged = int(line.split(" bytes of others")[0].rsplit(" ", 1)[1])
        assert {".metadata", f"__{rank}_0.distcp", f"rng-{rank}.pt"} <= fetched, line
        assert f"rng-{other}.pt" not in fetched and f"__{other}_0.distcp" not in fetched, line
        assert fetched < listed
        # Step counters and the like: a few KiB, against the whole file of the other rank.
        assert ranged < 0.05 * (state / f"__{other}_0.distcp").stat().st_size, line
    assert losses(tmp_path / "out") == pytest.approx(reference, abs=1e-6)


class _Payload:
    """Unpickling this would create a file: the proof that code from storage ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_training_state_metadata_is_read_without_running_code(tmp_path):
    import pickle

    import torch
    import torch.distributed.checkpoint as dcp

    from sami_worker.tasks import TaskError
    from sami_worker.train import load_dcp_metadata

    model = torch.nn.Linear(3, 2)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "state"), no_dist=True)
    metadata = load_dcp_metadata(tmp_path / "state" / ".metadata")
    assert set(metadata.state_dict_metadata) == {"model.weight", "model.bias"}

    marker = tmp_path / "pwned"
    evil = tmp_path / ".metadata"
    evil.write_bytes(pickle.dumps({"state": _Payload(marker)}))
    with pytest.raises(TaskError, match="has no place in a training state's metadata"):
        load_dcp_metadata(evil)
    assert not marker.exists()
