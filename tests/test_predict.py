"""`python -m xlmr_mini.predict`: files of texts in, one prediction per row out, in input order."""
import csv
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from xlmr_mini.check import main as check_main
from xlmr_mini.checkpoint import load_model, save_hf
from xlmr_mini.config import XLMRConfig
from xlmr_mini.copy_weights import scratch_state_dict
from xlmr_mini.data import Split, build_demo, encode_split
from xlmr_mini.inference import predict
from xlmr_mini.predict import main as predict_main
from xlmr_mini.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny random student over the demo's tokenizer (large random weights, so that its labels
    differ from text to text), and demo texts of many lengths."""
    root = tmp_path_factory.mktemp("predict")
    task = build_demo(root / "cache")
    cfg = XLMRConfig(vocab_size=Tokenizer(task.tokenizer_path).vocab_size, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=48, max_position_embeddings=40, id2label=task.labels,
                     initializer_range=1.0)
    save_hf(root / "model", cfg, scratch_state_dict(cfg, 0), task.tokenizer_path)
    texts = task.splits["dev"].texts[:37] + [" ".join(task.splits["dev"].texts[:20])]  # the last one is truncated
    return root / "model", texts


def expected(model_dir, texts: list[str]) -> np.ndarray:
    """Probabilities as `check` computes them: one padded batch, softmax of the logits."""
    with torch.no_grad():
        return load_model(model_dir).eval()(*Tokenizer(model_dir)(texts, max_length=38)).logits.softmax(-1).numpy()


def run(capsys, *args) -> tuple[list[dict], list[str], str]:
    """(records, warning lines, stdout)."""
    records = predict_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return records, [line for line in err.splitlines() if line.startswith("warning:")], out


def test_jsonl_in_input_order_with_bad_rows_and_all_scores(student, tmp_path, capsys):
    model_dir, texts = student
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    bad = {3: "{not json", 8: json.dumps({"id": 8}), 12: json.dumps({"text": None}), 20: json.dumps({"text": 7}),
           25: "[1, 2]", 30: json.dumps({"text": "   "})}
    for at, line in sorted(bad.items()):
        lines.insert(at, line)
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n\n")
    records, warnings, _ = run(capsys, "--model", model_dir, "--input", tmp_path / "in.jsonl", "--out",
                            tmp_path / "out.jsonl", "--all-scores", "--max-length", 38, "--batch-size", 5)
    assert [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()] == records
    assert len(records) == len(lines) and [r["error"] is not None for r in records if "error" in r] == [True] * 6
    assert [i for i, r in enumerate(records) if r["label"] is None] == sorted(bad)
    assert len(warnings) == 6 and warnings[0].startswith(f"warning: {tmp_path / 'in.jsonl'} line 4: not valid JSON")
    assert "no text field" in warnings[1] and "null" in warnings[2] and "int" in warnings[3] and "empty" in warnings[5]
    good = [r for r in records if r["label"] is not None]
    probs = expected(model_dir, texts)
    assert len({r["label"] for r in good}) > 1  # length-sorted batches mapped back: order matters
    labels = load_model(model_dir).cfg.id2label
    assert [r["label"] for r in good] == [labels[k] for k in probs.argmax(-1)]
    np.testing.assert_allclose([[r["scores"][name] for name in labels] for r in good], probs, atol=1e-5)  # fp32: other batches, other padding
    np.testing.assert_allclose([r["score"] for r in good], probs.max(-1), atol=1e-5)
    # evaluate's predictions on the same texts.
    split = Split(texts=texts, labels=np.zeros(len(texts), dtype=np.int64), langs=["x"] * len(texts))
    ids = predict(load_model(model_dir).eval(), encode_split(split, Tokenizer(model_dir), 38, cache_dir=False), 5)
    assert [r["label"] for r in good] == [labels[k] for k in ids]


def test_csv_txt_and_parquet_in_csv_out_and_check_agrees(student, tmp_path, capsys):
    model_dir, texts = student
    texts = texts[:6] + ['a "quoted", comma text']
    rows = [{"text": t, "lang": "x"} for t in texts]
    out = io.StringIO()
    writer = csv.DictWriter(out, ["lang", "text"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows[:3] + [{"lang": "x", "text": ""}] + rows[3:])
    (tmp_path / "in.csv").write_text(out.getvalue() + "x,extra,field\n")
    (tmp_path / "in.txt").write_text("\n".join(texts[:3] + [""] + texts[3:]) + "\n")
    pq.write_table(pa.table({"body": texts[:3] + [None] + texts[3:]}), tmp_path / "in.parquet")
    results, problems = {}, {}
    for name, extra in (("in.csv", []), ("in.txt", []), ("in.parquet", ["--text-column", "body"])):
        records, warnings, _ = run(capsys, "--model", model_dir, "--input", tmp_path / name, "--out",
                                   tmp_path / f"{name}.csv", *extra)
        with open(tmp_path / f"{name}.csv", newline="") as f:
            written = list(csv.DictReader(f))
        assert [w["label"] for w in written] == [r["label"] or "" for r in records]
        assert [w["error"] for w in written] == [r.get("error") or "" for r in records]
        results[name] = [r["label"] for r in records[:3] + records[4:4 + len(texts) - 3]]
        problems[name] = [(i, r["error"]) for i, r in enumerate(records) if r["label"] is None]
        assert len(warnings) == len(problems[name])
    assert results["in.csv"] == results["in.txt"] == results["in.parquet"] and None not in results["in.csv"]
    assert problems == {"in.csv": [(3, "empty text"), (8, "more fields than the header")],
                        "in.txt": [(3, "empty text")], "in.parquet": [(3, "the text is null")]}
    check_main([str(model_dir), "--text", texts[0], "--text", texts[-1]])
    printed = [line.split("\t")[:2] for line in capsys.readouterr().out.splitlines() if "\t" in line]
    assert [label for label, _ in printed] == [results["in.csv"][0], results["in.csv"][-1]]
    with open(tmp_path / "in.csv.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert [f"{float(written[i]['score']):.3f}" for i in (0, -2)] == [p for _, p in printed]


def test_bf16_precision_tracks_fp32(student, tmp_path, capsys):
    model_dir, texts = student
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    fp32, _, out32 = run(capsys, "--model", model_dir, "--input", tmp_path / "in.txt", "--out", tmp_path / "a.jsonl")
    bf16, _, out16 = run(capsys, "--model", model_dir, "--input", tmp_path / "in.txt", "--out", tmp_path / "b.jsonl",
                         "--precision", "bf16")
    assert "(fp32)" in out32 and "(bf16)" in out16
    diff = np.abs(np.array([r["score"] for r in bf16]) - [r["score"] for r in fp32])
    assert 0 < diff.max() and np.median(diff) < 0.02  # bf16 ran, and tracks fp32 (this model's weights are large)


@pytest.mark.parametrize("case", ["missing", "suffix", "column", "parquet", "same", "out_suffix", "header"])
def test_bad_files_are_one_line_exit_2_and_write_nothing(case, student, tmp_path, capsys):
    model_dir, texts = student
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": texts[0]}) + "\n")
    (tmp_path / "in.csv").write_text("body,lang\nhello,x\n")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "out.jsonl").write_text("kept\n")
    args = {"missing": ["--input", tmp_path / "nope.jsonl"], "suffix": ["--input", tmp_path / "in.xlsx"],
            "column": ["--input", tmp_path / "in.jsonl", "--text-column", "body"],
            "parquet": ["--input", tmp_path / "bad.parquet"], "same": ["--input", tmp_path / "out.jsonl"],
            "out_suffix": ["--input", tmp_path / "in.jsonl", "--out", tmp_path / "out.xlsx"],
            "header": ["--input", tmp_path / "in.csv"]}[case]
    if "--out" not in args:
        args += ["--out", tmp_path / "out.jsonl"]
    with pytest.raises(SystemExit) as e:
        predict_main([str(a) for a in ["--model", model_dir, *args]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
    assert (tmp_path / "out.jsonl").read_text() == "kept\n" and not (tmp_path / "out.xlsx").exists()
