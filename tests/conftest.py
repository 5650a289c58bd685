"""Shared fixtures: tiny random XLM-R checkpoints built with transformers (no downloads)."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# Without CUDA, the Triton kernels run on CPU tensors through Triton's interpreter; with CUDA the
# tests run the compiled kernels. Set before triton is imported (it reads the switch at import).
# `is_available` asks the driver without creating a CUDA context.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (setup.cfg: a worker per core) each worker, and the processes its tests
# start, gets its share of the cores: torch's default of all of them would oversubscribe.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _threads = max(1, _cores // WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TSM = SHARED / "data" / "tweet_sentiment_multilingual"
XLMR_TOKENIZER = SHARED / "tokenizers" / "xlm-roberta" / "tokenizer.json"  # XLM-R's real 250,002 pieces


def map_checkout_packages() -> None:
    """Make `kernels/` and `data/` importable as xlmr_mini.kernels / xlmr_mini.data as setup.py's
    package_dir does, when the checkout is not installed (an editable install already maps them)."""
    if importlib.util.find_spec("xlmr_mini.kernels") is not None:
        return
    import xlmr_mini

    for name in ("kernels", "data"):
        spec = importlib.util.spec_from_file_location(f"xlmr_mini.{name}", REPO / name / "__init__.py",
                                                      submodule_search_locations=[str(REPO / name)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        setattr(xlmr_mini, name, module)
        spec.loader.exec_module(module)


map_checkout_packages()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache directory (tokenized data, the demo's models, probes) per test module."""
    return tmp_path_factory.mktemp("cache")


def requires_shared(*parts: str):
    """Skip unless the real material `<repo>/../shared/<parts>` is present."""
    path = SHARED.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"real data not present: {path} is missing")


def hf_config(**overrides):
    from transformers import XLMRobertaConfig

    kw = dict(vocab_size=101, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              intermediate_size=37, max_position_embeddings=40, type_vocab_size=1, num_labels=5,
              layer_norm_eps=1e-5, attn_implementation="eager")
    kw.update(overrides)
    return XLMRobertaConfig(**kw)


def hf_classifier(seed: int = 0, **overrides):
    """A random transformers XLMRobertaForSequenceClassification in eval mode."""
    from transformers import XLMRobertaForSequenceClassification

    torch.manual_seed(seed)
    return XLMRobertaForSequenceClassification(hf_config(**overrides)).eval()


def padded_batch(vocab_size: int, lengths: list[int], pad_id: int = 1, seed: int = 0):
    """(input_ids, attention_mask) with `<s>` first, `</s>` last and pads after each length."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(3, vocab_size, (len(lengths), t), generator=g)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, 0], ids[row, n - 1] = 0, 2
    ids[mask == 0] = pad_id
    return ids, mask


def tiny_demo_model(cache: Path, path: Path, hidden: int = 32, heads: int = 2, intermediate: int = 48) -> Path:
    """A random 2-layer HF directory (32 wide unless told) over the demo's vocabulary and labels,
    with its tokenizer and XLM-R's dropout 0.1: a teacher or base for runs whose scores do not matter."""
    from xlmr_mini.checkpoint import save_hf
    from xlmr_mini.copy_weights import scratch_state_dict
    from xlmr_mini.data import build_demo
    from xlmr_mini.demo_models import demo_architecture

    task = build_demo(cache)
    arch = demo_architecture(task).replace(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                                           intermediate_size=intermediate)
    return save_hf(path, arch, scratch_state_dict(arch, 0), task.tokenizer_path)
