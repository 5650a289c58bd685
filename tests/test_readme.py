"""The README's commands, run in the order written, on the real tweets (../shared) with a small
base of XLM-R's layout and tokenizer: every one must succeed as written. Sizes that the small base
cannot have (--hidden 384) are scaled to it, and flags that shorten the runs are appended."""
import importlib
import re
import shlex

from conftest import REPO, TSM, XLMR_TOKENIZER, requires_shared
from xlmr_mini.checkpoint import save_hf
from xlmr_mini.config import XLMRConfig
from xlmr_mini.copy_weights import scratch_state_dict

# Appended per command: few steps, short texts, one thread, the test's cache.
QUICK = {"train": ["--max-steps", "2", "--max-length", "32", "--eval-batch-size", "512", "--num-threads", "1"],
         "evaluate": ["--max-length", "32", "--batch-size", "512"], "predict": ["--max-length", "32", "--batch-size", "512"],
         "trim": [], "copy_weights": [], "check": []}
CACHED = ("train", "evaluate", "trim")


def readme_commands() -> list[str]:
    """`python -m xlmr_mini.*` commands of the README's bash blocks on the real tweets and the
    models they make (not the demo's, massive's, the study's or torchrun's), in order."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [" ".join(line.split()) for line in lines if line.startswith("python -m xlmr_mini.")
            and "xlmr_mini.study" not in line and "massive:" not in line and "demo" not in line]


@requires_shared("data", "tweet_sentiment_multilingual")
@requires_shared("tokenizers", "xlm-roberta", "tokenizer.json")
def test_readme_pipeline_runs_as_written(tmp_path, monkeypatch, capsys):
    commands = readme_commands()
    modules = [c.split()[2].removeprefix("xlmr_mini.") for c in commands]
    assert modules == ["train", "train", "evaluate", "evaluate", "predict", "trim", "copy_weights", "check"], commands
    base = tmp_path / "xlm-roberta-base"
    cfg = XLMRConfig(hidden_size=32, num_hidden_layers=12, num_attention_heads=2, intermediate_size=48,
                     max_position_embeddings=130, id2label=("LABEL_0", "LABEL_1"))
    save_hf(base, cfg, scratch_state_dict(cfg, 0), XLMR_TOKENIZER)
    monkeypatch.chdir(tmp_path)  # the commands' relative paths (runs/teacher, ...) land here
    for command, module in zip(commands, modules):
        text = (command.replace("xlm-roberta-base/", str(base)).replace("tweet_sentiment_multilingual/", f"{TSM}/")
                .replace("--hidden 384", "--hidden 16"))
        argv = shlex.split(text)[3:] + QUICK.get(module, [])
        argv += ["--cache-dir", str(tmp_path / "cache")] if module in CACHED else []
        importlib.import_module(f"xlmr_mini.{module}").main(argv)
        assert "error" not in capsys.readouterr().err, command
    student = tmp_path / "runs" / "student"
    assert all((student / f"seed-{s}" / "best" / "model.safetensors").is_file() for s in (1, 2, 3))
    assert (student / "best" / "model.safetensors").is_file() and (tmp_path / "student-tsm" / "tokenizer.json").is_file()
    predictions = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == len((TSM / "english" / "val_text.txt").read_text().splitlines())
    assert not list(tmp_path.glob("runs/**/checkpoint"))  # finished runs keep no optimizer state
