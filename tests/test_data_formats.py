"""Readers on fixtures written in the published schemas, spec parsing, and every kind of bad input."""
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xlmr_mini.data import UNSEEN, load_task, parse_spec, select_languages
from xlmr_mini.data.__main__ import main as data_main
from xlmr_mini.errors import InputError

INTENTS = ["alarm_set", "audio_volume_mute", "iot_hue_lightchange", "weather_query"]
LOCALES = ["en-US", "de-DE", "sw-KE"]


def massive_rows(locale: str) -> list[dict]:
    """MASSIVE 1.1 records: every published key, 2 train + 1 dev per intent, 1 test."""
    rows = []
    for partition, per_intent in (("train", 2), ("dev", 1), ("test", 1)):
        for k, intent in enumerate(INTENTS[: None if partition != "test" else 1] * per_intent):
            rows.append({
                "id": str(len(rows) + 1), "locale": locale, "partition": partition,
                "scenario": intent.split("_")[0], "intent": intent,
                "utt": f"{locale} {partition} utterance {k} for {intent}",
                "annot_utt": f"{locale} {partition} utterance [time : {k}]",
                "worker_id": "17", "slot_method": [{"slot": "time", "method": "translation"}],
                "judgments": [{"worker_id": "3", "intent_score": 1, "slots_score": 1, "grammar_score": 4,
                               "spelling_score": 2, "language_identification": "target"}],
            })
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def massive_dir(tmp_path) -> Path:
    for loc in LOCALES:
        write_jsonl(tmp_path / "1.1" / "data" / f"{loc}.jsonl", massive_rows(loc))
    return tmp_path / "1.1" / "data"


def hf_metadata(features: dict) -> dict:
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


def write_massive_parquet(root: Path, intent_as_int: bool, layout: str = "folders") -> Path:
    names = sorted(INTENTS)[::-1]  # HF's class order is not alphabetical
    for loc in LOCALES:
        by_split = {}
        for row in massive_rows(loc):
            by_split.setdefault(row["partition"], []).append(row)
        for partition, rows in by_split.items():
            split = {"dev": "validation"}.get(partition, partition)
            columns = {
                "id": [r["id"] for r in rows], "locale": [r["locale"] for r in rows],
                "partition": [r["partition"] for r in rows], "scenario": [r["scenario"] for r in rows],
                "intent": [names.index(r["intent"]) if intent_as_int else r["intent"] for r in rows],
                "utt": [r["utt"] for r in rows], "annot_utt": [r["annot_utt"] for r in rows],
            }
            features = {"intent": {"names": names, "_type": "ClassLabel"} if intent_as_int else {"dtype": "string", "_type": "Value"}}
            table = pa.table(columns).replace_schema_metadata(hf_metadata(features))
            path = root / loc / split / "0000.parquet" if layout == "folders" else root / loc / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
    return root


def check_massive(task, splits=("train", "dev", "test")):
    assert task.name == "massive" and task.labels == tuple(sorted(INTENTS))
    assert set(task.splits) == set(splits)
    assert task.splits["train"].counts() == {loc: 8 for loc in sorted(LOCALES)}
    assert task.splits["dev"].counts() == {loc: 4 for loc in sorted(LOCALES)}
    train = task.splits["train"]
    for text, label in zip(train.texts, train.labels):
        assert text.endswith(task.labels[label])
    assert task.unseen == UNSEEN["massive"] and task.seen == {"en-US", "de-DE"}


# ---------------------------------------------------------------------------------------------
# MASSIVE


def test_massive_release_dir(massive_dir):
    check_massive(load_task(f"massive:{massive_dir}"))
    check_massive(load_task(f"massive:{massive_dir.parent.parent}"))  # the unpacked release root


def test_massive_single_locale_file(massive_dir):
    task = load_task(f"massive:{massive_dir / 'de-DE.jsonl'}")
    assert task.languages == ("de-DE",) and len(task.splits["train"]) == 8


def test_massive_tar_gz(massive_dir, tmp_path):
    archive = tmp_path / "amazon-massive-dataset-1.1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(massive_dir.parent.parent / "1.1", arcname="1.1")
        info = tarfile.TarInfo("1.1/NOTICE.md")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"notice"))
    check_massive(load_task(f"massive:{archive}"))


@pytest.mark.parametrize("intent_as_int", [False, True])
@pytest.mark.parametrize("layout", ["folders", "files"])
def test_massive_hf_parquet(tmp_path, intent_as_int, layout):
    check_massive(load_task(f"massive:{write_massive_parquet(tmp_path / 'hf', intent_as_int, layout)}"))


def test_massive_parquet_int_intent_without_names(tmp_path):
    path = tmp_path / "en-US" / "train" / "0000.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"locale": ["en-US"], "partition": ["train"], "utt": ["hi"], "intent": [3]}), path)
    with pytest.raises(InputError, match=r"0000\.parquet: integer 'intent' without class names"):
        load_task(f"massive:{tmp_path}")


def test_massive_unseen_override_and_unknown_locale(massive_dir):
    task = load_task(f"massive:{massive_dir}?unseen=de-DE,en-US")
    assert task.seen == {"sw-KE"}
    with pytest.raises(InputError, match="unknown massive language.*in partition list: xx-XX"):
        load_task(f"massive:{massive_dir}?unseen=de-DE,xx-XX")


# ---------------------------------------------------------------------------------------------
# tweet_sentiment_multilingual

TSM_LANGS = ["english", "french", "hindi"]


@pytest.fixture
def tsm_dir(tmp_path) -> Path:
    for lang in TSM_LANGS:
        for split, n in (("train", 6), ("val", 3), ("test", 3)):
            (tmp_path / lang).mkdir(exist_ok=True)
            # Published files: one tweet per line, trailing space, no newline after the last line.
            texts = [f"@user {lang} {split} tweet {i} \u2028inside " for i in range(n)]
            (tmp_path / lang / f"{split}_text.txt").write_text("\n".join(texts), encoding="utf-8")
            (tmp_path / lang / f"{split}_labels.txt").write_text("\n".join(str(i % 3) for i in range(n)))
    return tmp_path


def test_tsm_text_layout(tsm_dir):
    task = load_task(f"tsm:{tsm_dir}")
    assert task.labels == ("negative", "neutral", "positive") and set(task.splits) == {"train", "dev", "test"}
    assert task.splits["train"].counts() == {lang: 6 for lang in TSM_LANGS}
    assert task.splits["dev"].counts() == {lang: 3 for lang in TSM_LANGS}
    assert task.splits["train"].texts[1] == "@user english train tweet 1 \u2028inside "  # U+2028 is not a line break here
    assert task.splits["train"].labels[:6].tolist() == [0, 1, 2, 0, 1, 2]
    assert task.seen == {"english"} and task.english == "english"
    one = load_task(f"tsm:{tsm_dir / 'hindi'}")  # a single language folder
    assert one.languages == ("hindi",)


def write_tsm_parquet(root: Path, layout: str, with_all: bool = False) -> Path:
    names = ["negative", "neutral", "positive"]
    configs = TSM_LANGS + (["all"] if with_all else [])
    for config in configs:
        for split, n in (("train", 6), ("validation", 3), ("test", 3)):
            table = pa.table({"text": [f"{config} {split} {i}" for i in range(n)],
                              "label": pa.array([i % 3 for i in range(n)], pa.int64())})
            table = table.replace_schema_metadata(hf_metadata({"label": {"names": names, "_type": "ClassLabel"}}))
            path = root / config / split / "0000.parquet" if layout == "folders" else root / config / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
    return root


@pytest.mark.parametrize("layout", ["folders", "files"])
def test_tsm_hf_parquet(tmp_path, layout):
    task = load_task(f"tsm:{write_tsm_parquet(tmp_path, layout, with_all=True)}")
    assert task.splits["train"].counts() == {lang: 6 for lang in TSM_LANGS}
    assert task.splits["dev"].counts() == {lang: 3 for lang in TSM_LANGS}
    assert task.splits["test"].labels[:3].tolist() == [0, 1, 2]
    assert len(task.notes) == 1 and "skipped the 'all' config (3 file(s), 12 rows)" in task.notes[0]


# ---------------------------------------------------------------------------------------------
# Generic files


def generic_rows(split=None):
    rows = [{"sentence": f"text {i}", "y": ["pos", "neg", "mid"][i % 3], "language": ["xx", "en"][i % 2]} for i in range(12)]
    if split:
        for i, r in enumerate(rows):
            r["part"] = "train" if i < 8 else "validation"
    return rows


def test_generic_jsonl_with_split_column(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", generic_rows(split=True))
    task = load_task(f"file:{path}?text=sentence&label=y&lang=language&split=part&unseen=xx")
    assert task.name == "file" and task.labels == ("mid", "neg", "pos")
    assert len(task.splits["train"]) == 8 and len(task.splits["dev"]) == 4
    assert task.unseen == {"xx"} and task.english == "en"
    assert select_languages(task.splits["train"], "english", task).counts() == {"en": 4}


def test_generic_folder_csv_and_parquet(tmp_path):
    rows = [{"text": f'say "{i}", ok', "label": i % 4, "lang": "de"} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows[:8]), tmp_path / "train.parquet")
    lines = ["text,label,lang"] + [f'"say ""{i}"", ok",{i % 4},de' for i in range(8, 10)]
    (tmp_path / "dev.csv").write_text("\n".join(lines) + "\n")
    task = load_task(f"file:{tmp_path}")
    assert task.labels == ("0", "1", "2", "3")
    assert task.splits["dev"].texts == ['say "8", ok', 'say "9", ok'] and task.splits["dev"].labels.tolist() == [0, 1]


def test_generic_single_file_without_split_column(tmp_path):
    path = write_jsonl(tmp_path / "all.jsonl", [{"text": "a", "label": 1, "lang": "en"}, {"text": "b", "label": 10, "lang": "en"}])
    task = load_task(f"file:{path}")
    assert set(task.splits) == {"train"} and task.labels == ("1", "10")
    assert task.notes == (f"{path}: no 'split' column; all 2 rows are train",)


# ---------------------------------------------------------------------------------------------
# Specs and bad input: one InputError line naming the file (and line), exit code 2 from the CLI


def test_parse_spec():
    assert parse_spec("demo") == ("demo", "", {})
    assert parse_spec("file:/x/y.csv?text=t&lang=l") == ("file", "/x/y.csv", {"text": "t", "lang": "l"})
    for bad in ["massive", "hf:foo", "massive:", "tsm:/x?color=red"]:
        with pytest.raises(InputError, match="dataset spec"):
            parse_spec(bad)


def _error(spec: str) -> str:
    with pytest.raises(InputError) as e:
        load_task(spec)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_missing_files_and_splits(tmp_path, tsm_dir, massive_dir):
    assert "no such file or directory" in _error(f"massive:{tmp_path / 'nope'}")
    (tsm_dir / "french" / "val_labels.txt").unlink()
    assert _error(f"tsm:{tsm_dir}") == f"{tsm_dir / 'french' / 'val_labels.txt'}: file not found (the labels for val_text.txt)"
    (tsm_dir / "french" / "val_text.txt").unlink()
    assert _error(f"tsm:{tsm_dir}") == f"{tsm_dir}: split 'dev' is missing for language(s) french"
    write_jsonl(massive_dir / "sw-KE.jsonl", [r for r in massive_rows("sw-KE") if r["partition"] != "dev"])
    assert _error(f"massive:{massive_dir}") == f"{massive_dir}: split 'dev' is missing for language(s) sw-KE"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no MASSIVE .jsonl or .parquet files" in _error(f"massive:{empty}")


def test_label_line_count_mismatch(tsm_dir):
    (tsm_dir / "hindi" / "train_labels.txt").write_text("0\n1\n2\n0\n1\n")
    assert _error(f"tsm:{tsm_dir}") == f"{tsm_dir / 'hindi' / 'train_labels.txt'}: 5 lines but train_text.txt has 6"


def test_label_outside_label_set(tsm_dir, massive_dir, tmp_path):
    (tsm_dir / "english" / "val_labels.txt").write_text("0\n3\n1")
    assert _error(f"tsm:{tsm_dir}") == f"{tsm_dir / 'english' / 'val_labels.txt'} line 2: label '3' is not one of 0, 1, 2 (negative, neutral, positive)"
    rows = massive_rows("de-DE")
    rows[-2]["intent"] = "alarm_snooze"  # a dev intent the train split does not have
    write_jsonl(massive_dir / "de-DE.jsonl", rows)
    assert _error(f"massive:{massive_dir}") == (
        f"{massive_dir / 'de-DE.jsonl'} line {len(rows) - 1}: label 'alarm_snooze' is not in the train split's 4 labels")
    path = write_jsonl(tmp_path / "g" / "dev.jsonl", [{"text": "a", "label": "zzz", "lang": "en"}])
    write_jsonl(tmp_path / "g" / "train.jsonl", [{"text": "a", "label": "x", "lang": "en"}])
    assert _error(f"file:{tmp_path / 'g'}") == f"{path} line 1: label 'zzz' is not in the train split's 1 labels"


def test_empty_split(tsm_dir, tmp_path):
    (tsm_dir / "french" / "test_text.txt").write_text("")
    (tsm_dir / "french" / "test_labels.txt").write_text("")
    assert _error(f"tsm:{tsm_dir}") == f"{tsm_dir / 'french' / 'test_text.txt'}: empty split, no examples"
    write_jsonl(tmp_path / "m" / "en-US.jsonl", [])
    assert _error(f"massive:{tmp_path / 'm'}") == f"{tmp_path / 'm' / 'en-US.jsonl'}: empty file, no examples"


def test_unknown_locale_in_partition_list(massive_dir):
    task = load_task(f"massive:{massive_dir}")
    with pytest.raises(InputError, match=r"unknown language\(s\) fr-FR in language list"):
        select_languages(task.splits["train"], ["en-US", "fr-FR"], task)
    with pytest.raises(InputError, match="has no English"):
        select_languages(task.splits["train"], "english", load_task(f"massive:{massive_dir / 'sw-KE.jsonl'}"))


def test_non_utf8_line(tsm_dir, massive_dir):
    path = tsm_dir / "english" / "train_text.txt"
    path.write_bytes(b"fine\nalso fine\nbad \xff byte\nx\ny\nz")
    assert _error(f"tsm:{tsm_dir}") == f"{path} line 3: not valid UTF-8 (byte 0xff)"
    raw = (massive_dir / "en-US.jsonl").read_bytes().split(b"\n")
    raw[4] = raw[4].replace(b"utterance", b"utter\xc3ance")
    (massive_dir / "en-US.jsonl").write_bytes(b"\n".join(raw))
    assert _error(f"massive:{massive_dir}") == f"{massive_dir / 'en-US.jsonl'} line 5: not valid UTF-8 (byte 0xc3)"


def test_malformed_json_line(massive_dir, tmp_path):
    lines = (massive_dir / "de-DE.jsonl").read_text().split("\n")
    lines[6] = lines[6][:-5]
    (massive_dir / "de-DE.jsonl").write_text("\n".join(lines))
    message = _error(f"massive:{massive_dir}")
    assert message.startswith(f"{massive_dir / 'de-DE.jsonl'} line 7: malformed JSON (")
    write_jsonl(tmp_path / "x" / "en-US.jsonl", [{"locale": "en-US", "partition": "train", "utt": 5, "intent": "a"}])
    assert _error(f"massive:{tmp_path / 'x'}") == f"{tmp_path / 'x' / 'en-US.jsonl'} line 1: field 'utt' should be a string, got 5"
    write_jsonl(tmp_path / "y" / "en-US.jsonl", [{"locale": "en-US", "partition": "train", "utt": "u", "intent": "a"},
                                                 {"locale": "en-US", "partition": "train", "utt": "u"}])
    assert _error(f"massive:{tmp_path / 'y'}") == f"{tmp_path / 'y' / 'en-US.jsonl'} line 2: missing value for 'intent'"


def test_blank_lines_are_counted_not_silent(massive_dir):
    path = massive_dir / "en-US.jsonl"
    path.write_text(path.read_text().replace("\n", "\n\n", 2))
    task = load_task(f"massive:{massive_dir}")
    assert task.splits["train"].counts()["en-US"] == 8
    assert task.notes == (f"{path}: skipped 2 blank line(s)",)


def test_cli_exit_codes(massive_dir, tsm_dir, capsys):
    report = data_main([f"massive:{massive_dir}", "--langs", "seen", "--json"])
    assert report["labels"] == 4 and report["splits"]["train"]["languages"] == {"de-DE": 8, "en-US": 8}
    (tsm_dir / "hindi" / "train_labels.txt").write_text("0\n1\n")
    with pytest.raises(SystemExit) as e:
        data_main([f"tsm:{tsm_dir}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: {tsm_dir / 'hindi' / 'train_labels.txt'}: 2 lines but train_text.txt has 6\n"
    out = subprocess.run([sys.executable, "-m", "xlmr_mini.data", f"massive:{massive_dir}?unseen=zz-ZZ"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown massive language(s) in partition list: zz-ZZ" in out.stderr


def test_generic_bad_files(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a", "label": 1, "lang": "en"}, {"text": "b", "label": "x", "lang": "en"}])
    assert _error(f"file:{path}") == f"{path} line 2: field 'label' is a string here but a number above"
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "train.parquet").write_bytes(b"PAR1 but not really")
    assert _error(f"file:{tmp_path / 'p'}").startswith(f"{tmp_path / 'p' / 'train.parquet'}: cannot read parquet (")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.csv").write_text("text,label\na,1\n")
    assert _error(f"file:{tmp_path / 'd'}") == (
        f"{tmp_path / 'd' / 'train.csv'}: no column(s) lang (set the names with ?text=..&label=..&lang=..)")
    # Through the CLI too: arrow's threaded CSV reader used to abort the interpreter at exit (rc 134).
    out = subprocess.run([sys.executable, "-m", "xlmr_mini.data", f"file:{tmp_path / 'd'}?lang=text"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "train       1 examples, 1 labels present: a=1" in out.stdout, out.stderr
    (tmp_path / "d" / "dev.csv").write_text("text,label\na,1\n")
    out = subprocess.run([sys.executable, "-m", "xlmr_mini.data", f"file:{tmp_path / 'd'}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "no column(s) lang" in out.stderr
