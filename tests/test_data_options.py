"""Data as users have it: their own column names, a selection of files in a folder (per split), a prompt budget in
tokens; and every such option that cannot apply refused naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ray_jobs.data.sources import read_source
from ray_jobs.data.stage import run as prepare_data
from ray_jobs.events import EventLog
from ray_jobs.spec import SpecError, parse_spec


def _renamed_rows(tag: str, n: int) -> list[dict]:
    return [{"question": f"{tag} question {i}?", "good": f"A fine answer {i}.", "bad": f"No {i}."} for i in range(n)]


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def folder(tmp_path) -> Path:
    """A folder of JSON Lines files with their own column names: two shards of training data and one of test data."""
    root = tmp_path / "mydata"
    _write(root / "train-000.jsonl", _renamed_rows("first", 6))
    _write(root / "train-001.jsonl", _renamed_rows("second", 4))
    _write(root / "test-000.jsonl", _renamed_rows("held", 3))
    return root


def _spec(tiny_llama: Path, folder: Path, **data) -> object:
    data = {"source": str(folder), "apply_chat_template": False, "test_fraction": 0.2, **data}
    return parse_spec({"reference": str(tiny_llama), "data": data})


def _all_rows(job: Path) -> list[dict]:
    return (
        pq.read_table(job / "data" / "train.parquet").to_pylist()
        + pq.read_table(job / "data" / "test.parquet").to_pylist()
    )


COLUMNS = {"prompt": "question", "chosen": "good", "rejected": "bad"}


def test_renamed_columns_and_a_data_files_selection_load(tmp_path, tiny_llama, folder):
    spec = _spec(tiny_llama, folder, data_files="train-*.jsonl", columns=COLUMNS)
    job = tmp_path / "job"
    summary = prepare_data(spec, job, EventLog(job))
    rows = _all_rows(job)
    assert (summary["format"], summary["rows_read"], summary["kept"]) == ("standard", 10, 10)
    # Only the selected files, read with the mapping: the chosen column became the preferred response.
    assert sorted(r["prompt"] for r in rows) == sorted(
        [f"first question {i}?" for i in range(6)] + [f"second question {i}?" for i in range(4)]
    )
    assert all(r["label"] == 1 and r["response_a"].startswith("A fine answer") for r in rows)


def test_a_data_files_mapping_names_each_split(tmp_path, tiny_llama, folder):
    files = {"train": ["train-000.jsonl", "train-001.jsonl"], "test": "test-*.jsonl"}
    spec = _spec(tiny_llama, folder, data_files=files, split="test", columns=COLUMNS)
    summary = prepare_data(spec, tmp_path / "job", EventLog(tmp_path / "job"))
    assert summary["rows_read"] == 3
    assert sorted(r["prompt"] for r in _all_rows(tmp_path / "job")) == [f"held question {i}?" for i in range(3)]


def _field_of(err: pytest.ExceptionInfo) -> list[str]:
    return [e["field"] for e in err.value.errors]


def test_options_that_cannot_apply_are_refused_naming_them(tmp_path, tiny_llama, folder):
    job = tmp_path / "job"
    cases = [
        ({"data_files": "train-*.jsonl", "columns": {**COLUMNS, "chosen": "best"}}, "data.columns.chosen", "'best'"),
        ({"data_files": "nothing-*.parquet"}, "data.data_files", "matches no file"),
        ({"data_files": {"train": "train-*.jsonl"}, "split": "validation"}, "data.split", "not a split"),
        ({"data_files": "../*"}, "data.data_files", None),
    ]
    for data, field, words in cases:
        with pytest.raises(SpecError) as err:
            prepare_data(_spec(tiny_llama, folder, **data), job, EventLog(job))
        assert _field_of(err) == [field], data
        if words:
            assert words in str(err.value)
    assert not (job / "data").exists()  # nothing half-written is published
    # Hub-only options on a folder that exists here (named as a hub id would be), and a split of a single file.
    with pytest.raises(SpecError) as err:
        read_source(str(folder), config="comparisons")
    assert _field_of(err) == ["data.config"]
    with pytest.raises(SpecError) as err:
        read_source(str(folder / "test-000.jsonl"), split="test")
    assert _field_of(err) == ["data.split"]


def test_the_spec_refuses_options_its_source_cannot_take():
    cases = [
        ({"source": "prefs.jsonl", "config": "comparisons"}, "data.config"),
        ({"source": "./local-folder", "revision": "main"}, "data.revision"),
        ({"source": "prefs.jsonl", "data_files": "*.jsonl"}, "data.data_files"),
        ({"source": "builtin:reviews", "columns": {"prompt": "q"}}, "data.columns"),
        ({"source": "prefs.jsonl", "long_prompts": "drop"}, "data.long_prompts"),
    ]
    for data, field in cases:
        with pytest.raises(SpecError) as err:
            parse_spec({"data": data})
        assert _field_of(err) == [field], data
    ok = parse_spec({"data": {"source": "openai/summarize_from_feedback", "config": "comparisons", "revision": "v1"}})
    assert (ok.data.config, ok.data.revision) == ("comparisons", "v1")


def test_the_prompt_budget_truncates_or_drops_and_counts(tmp_path, tiny_llama):
    from ray_jobs.models.registry import load_tokenizer

    tokenizer = load_tokenizer(tiny_llama)
    long_prompt = "Please tell me, in as much detail as you can manage, what you think of this long question?"
    rows = [{"prompt": long_prompt, "chosen": f"Yes {i}.", "rejected": f"No {i}."} for i in range(3)]
    rows += [{"prompt": f"Short {i}?", "chosen": "Yes.", "rejected": "No."} for i in range(7)]
    source = tmp_path / "prefs.jsonl"
    _write(source, rows)
    budget = 6
    assert len(tokenizer(long_prompt, add_special_tokens=False)["input_ids"]) > budget
    assert all(len(tokenizer(f"Short {i}?", add_special_tokens=False)["input_ids"]) <= budget for i in range(7))

    spec = _spec(tiny_llama, source, max_prompt_tokens=budget)
    summary = prepare_data(spec, tmp_path / "cut", EventLog(tmp_path / "cut"))
    assert summary["prompt_budget"] == {
        "max_tokens": budget,
        "mode": "truncate",
        "prompts_over": 1,
        "rows_truncated": 3,
        "rows_dropped": 0,
    }
    cut = {r["prompt"] for r in _all_rows(tmp_path / "cut") if not r["prompt"].startswith("Short")}
    assert len(cut) == 1
    kept = cut.pop()
    # The prompt's own last characters, `budget` tokens of them.
    assert long_prompt.endswith(kept) and len(kept) < len(long_prompt)
    assert len(tokenizer(kept, add_special_tokens=False)["input_ids"]) <= budget

    spec = _spec(tiny_llama, source, max_prompt_tokens=budget, long_prompts="drop")
    summary = prepare_data(spec, tmp_path / "drop", EventLog(tmp_path / "drop"))
    assert (summary["prompt_budget"]["rows_dropped"], summary["kept"]) == (3, 7)
    assert all(r["prompt"].startswith("Short") for r in _all_rows(tmp_path / "drop"))
