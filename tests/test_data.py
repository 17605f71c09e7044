"""Preference data: every source and format into the normal form, row-level errors, splits, length bias, the data
stage's folder, and builtin:reviews against the real VADER oracle."""

from __future__ import annotations

import gzip
import json
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_jobs.data import DatasetError, load_preference_data, load_split, ray_split
from ray_jobs.data.formats import common_prompt
from ray_jobs.data.length_bias import apply_length_bias, words
from ray_jobs.data.split import split_by_prompt
from ray_jobs.data.stage import run as prepare_data
from ray_jobs.events import EventLog, read_events
from ray_jobs.layout import PREFERENCES
from ray_jobs.models.registry import ModelNotFoundError
from ray_jobs.spec import parse_spec

TLDR = "tldr/google_text_small_preference_dataset.jsonl"
TLDR_OPENAI = "tldr/openai_comparisons_batch18_first100.jsonl"
HH = "hh-rlhf/harmless-base-test.jsonl.gz"


def write_jsonl(path: Path, rows: list) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
    return path


STANDARD = [
    {"prompt": "Name a fruit.", "chosen": " An apple.", "rejected": " A chair."},
    {"prompt": "Say hi.", "chosen": " Hello!", "rejected": " Go away."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from ray_jobs.models.registry import load_tokenizer

    return load_tokenizer(tiny_llama)


@pytest.fixture(scope="module")
def tldr_rows(shared_data) -> list[dict]:
    return load_preference_data(str(shared_data / TLDR)).to_list()


# --- sources and formats ---------------------------------------------------------------------------------------


def test_standard_jsonl_keeps_prompt_and_marks_chosen_preferred(tmp_path):
    ds = load_preference_data(str(write_jsonl(tmp_path / "d.jsonl", STANDARD)))
    assert ds.column_names == ["prompt", "response_a", "response_b", "label", "ended_a", "ended_b"]
    assert ds.to_list()[1] == {
        "prompt": "Say hi.",
        "response_a": " Hello!",
        "response_b": " Go away.",
        "label": 1,
        "ended_a": True,  # written text: nothing was cut at a generation cap
        "ended_b": True,
    }
    assert str(ds.features["label"].dtype) == "int8"


def test_json_list_and_json_lines_named_json(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps({"data": STANDARD}))
    as_lines = write_jsonl(tmp_path / "lines.json", STANDARD)
    for path in (tmp_path / "list.json", as_lines):
        assert load_preference_data(str(path))["response_a"] == [" An apple.", " Hello!"]


def test_csv_gz_tldr_vertex_choice_becomes_label(tmp_path):
    path = tmp_path / "pairs.csv.gz"
    csv = "input_text,candidate_0,candidate_1,choice\nPost one [summary]: ,short,a longer one,1\nPost two,x y,z,0\n"
    path.write_bytes(gzip.compress(csv.encode()))
    rows = load_preference_data(str(path)).to_list()
    # choice is the preferred index: choice 1 means candidate_1 (response_b) won, so label 0.
    ended = {"ended_a": True, "ended_b": True}
    assert rows == [
        {"prompt": "Post one [summary]: ", "response_a": "short", "response_b": "a longer one", "label": 0} | ended,
        {"prompt": "Post two", "response_a": "x y", "response_b": "z", "label": 1} | ended,
    ]


def test_unlabeled_parquet_keeps_null_labels(tmp_path):
    table = pa.table(
        {
            "prompt": ["p1", "p2", "p3"],
            "response_a": ["a", "b", "c"],
            "response_b": ["d", "e", "f"],
            "label": pa.array([None, 1, 0], pa.int8()),
        }
    )
    pq.write_table(table, tmp_path / "u.parquet")
    pq.write_table(table.drop(["label"]), tmp_path / "nolabel.parquet")
    assert load_preference_data(str(tmp_path / "u.parquet"))["label"] == [None, 1, 0]
    assert load_preference_data(str(tmp_path / "nolabel.parquet"))["label"] == [None, None, None]


def test_save_to_disk_folder_picks_the_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(STANDARD),
            "test": datasets.Dataset.from_list([{"prompt": "q", "chosen": "yes", "rejected": "no"}]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_preference_data(str(tmp_path / "dd"), split="test")["response_a"] == ["yes"]
    assert len(load_preference_data(str(tmp_path / "dd"))) == 2
    with pytest.raises(DatasetError, match="no split 'validation'.*train, test"):
        load_preference_data(str(tmp_path / "dd"), split="validation")


def test_tldr_openai_format_builds_the_post_prompt(tmp_path):
    row = {
        "info": {"post": "My cat ignores me.", "title": "Cat trouble", "subreddit": "cats"},
        "summaries": [{"text": " cat ignores me"}, {"text": " my cat is aloof, help"}],
        "choice": 1,
    }
    [out] = load_preference_data(str(write_jsonl(tmp_path / "o.jsonl", [row]))).to_list()
    assert out["prompt"] == "SUBREDDIT: r/cats\nTITLE: Cat trouble\nPOST: My cat ignores me.\n\nTL;DR:"
    assert (out["response_a"], out["response_b"], out["label"]) == (" cat ignores me", " my cat is aloof, help", 0)


def test_implicit_prompt_splits_at_the_last_shared_assistant_turn(tmp_path):
    shared = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: Recommend a book?\n\nAssistant:"
    row = {"chosen": shared + " Assistant's pick: Dune.", "rejected": shared + " Assistant's choice: no."}
    [out] = load_preference_data(str(write_jsonl(tmp_path / "hh.jsonl.gz", [row]))).to_list()
    # The shared prefix runs on to " Assistant's "; the prompt must still end at the turn boundary.
    assert out["prompt"] == shared
    assert (out["response_a"], out["response_b"]) == (" Assistant's pick: Dune.", " Assistant's choice: no.")


def test_common_prompt_without_turn_markers_never_cuts_a_word():
    assert common_prompt("Tell me about cats. They purr", "Tell me about cats. Theirs are") == "Tell me about cats. "
    assert common_prompt("Q: colour? red", "Q: colour? red and blue") == "Q: colour? "


def test_implicit_transcript_becomes_chat_turns_with_a_template(tmp_path, tokenizer):
    shared = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: A joke?\n\nAssistant:"
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": shared + " Knock knock.", "rejected": shared + " No."}])
    [out] = load_preference_data(str(path), tokenizer=tokenizer).to_list()
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "A joke?"},
    ]
    assert out["prompt"] == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (out["response_a"], out["response_b"]) == ("Knock knock.", "No.")


def test_conversational_rendered_with_the_chat_template(tmp_path, tokenizer):
    user = [{"role": "user", "content": "Name a colour."}]
    explicit = {
        "prompt": user,
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Seven."}],
    }
    implicit = {
        "chosen": [*user, {"role": "assistant", "content": "Red."}],
        "rejected": [*user, {"role": "assistant", "content": "Table."}],
    }
    rows = load_preference_data(str(write_jsonl(tmp_path / "c.jsonl", [explicit])), tokenizer=tokenizer).to_list()
    rows += load_preference_data(str(write_jsonl(tmp_path / "i.jsonl", [implicit])), tokenizer=tokenizer).to_list()
    rendered = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>user\nName a colour.") and rendered.endswith("assistant\n")
    assert [(r["prompt"], r["response_a"], r["response_b"], r["label"]) for r in rows] == [
        (rendered, "Blue.", "Seven.", 1),
        (rendered, "Red.", "Table.", 1),
    ]
    with pytest.raises(DatasetError, match="needs a tokenizer"):
        load_preference_data(str(tmp_path / "c.jsonl"))


def test_string_prompts_wrapped_in_the_template_only_when_asked(tmp_path, tokenizer):
    path = str(write_jsonl(tmp_path / "d.jsonl", STANDARD[:1]))
    templated = load_preference_data(path, tokenizer=tokenizer)[0]["prompt"]
    assert templated == "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n"
    assert load_preference_data(path, tokenizer=tokenizer, apply_chat_template=False)[0]["prompt"] == "Name a fruit."


# --- bad rows ----------------------------------------------------------------------------------------------------

GOOD = {"prompt": "p", "chosen": "yes", "rejected": "no"}
BAD_ROWS = [
    ({"prompt": "p", "chosen": "yes"}, "rejected", "missing field"),
    ({**GOOD, "chosen": ""}, "chosen", "empty text"),
    ({**GOOD, "prompt": 42}, "prompt", "non-string"),
    ({**GOOD, "rejected": "yes"}, "rejected", "identical responses"),
    ({**GOOD, "rejected": "bad \udcff byte"}, "rejected", "undecodable bytes"),
]


@pytest.mark.parametrize(("bad", "field", "reason"), BAD_ROWS, ids=[r for _, _, r in BAD_ROWS])
def test_each_bad_row_is_reported_with_its_row_number(tmp_path, bad, field, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DatasetError) as info:
        load_preference_data(str(path))
    assert f"row 3, field '{field}'" in str(info.value) and "1 of 4 rows are invalid" in str(info.value)
    assert [(e["row"], e["field"], e["reason"]) for e in info.value.errors] == [(3, field, reason)]


def test_raw_undecodable_bytes_and_broken_json_lines(tmp_path):
    lines = [json.dumps(GOOD).encode(), b'{"prompt": "p", "chosen": "caf\xe9", "rejected": "no"}', b"{not json"]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DatasetError) as info:
        load_preference_data(str(tmp_path / "d.jsonl"))
    assert [(e["row"], e["field"], e["reason"]) for e in info.value.errors] == [
        (2, "chosen", "undecodable bytes"),
        (3, None, "bad record"),
    ]
    assert "row 3: not valid JSON" in str(info.value)


def test_bad_label_names_the_choice_field(tmp_path):
    rows = [{"input_text": "post", "candidate_0": "a", "candidate_1": "b", "choice": c} for c in (0, 2, "x", None)]
    with pytest.raises(DatasetError) as info:
        load_preference_data(str(write_jsonl(tmp_path / "v.jsonl", rows)))
    assert [(e["row"], e["field"], e["reason"]) for e in info.value.errors] == [
        (2, "choice", "bad label"),
        (3, "choice", "bad label"),
        (4, "choice", "missing field"),
    ]


def test_fail_lists_the_first_twenty_and_the_total(tmp_path):
    rows = [GOOD] + [{**GOOD, "chosen": ""}] * 30
    with pytest.raises(DatasetError) as info:
        load_preference_data(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    message = str(info.value)
    assert "30 of 31 rows are invalid (30 empty text)" in message
    assert "row 21, field 'chosen'" in message and "row 22," not in message and "... and 10 more" in message


def test_skip_counts_skipped_rows_by_reason(tmp_path, tiny_llama):
    rows = [GOOD, {**GOOD, "chosen": ""}, {**GOOD, "rejected": "yes"}, {**GOOD, "chosen": ""}, {"prompt": "p"}]
    ds = load_preference_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), on_error="skip")
    assert len(ds) == 1
    spec = parse_spec({"reference": str(tiny_llama), "data": {"source": str(tmp_path / "d.jsonl"), "on_error": "skip"}})
    summary = prepare_data(spec, tmp_path / "job", EventLog(tmp_path / "job"))
    assert summary["skipped"] == {"empty text": 2, "identical responses": 1, "missing field": 1}
    assert (summary["rows_read"], summary["valid"]) == (5, 1)


def test_undetectable_columns_and_missing_paths(tmp_path):
    with pytest.raises(DatasetError, match="cannot tell the data format from the columns \\['q', 'x'\\]"):
        load_preference_data(str(write_jsonl(tmp_path / "d.jsonl", [{"q": 1, "x": 2}])))
    with pytest.raises(DatasetError, match="no such file"):
        load_preference_data(str(tmp_path / "missing.jsonl"))


def test_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DatasetError, match="hub is unreachable.*local path"):
        load_preference_data("Anthropic/hh-rlhf")
    assert time.monotonic() - start < 2.0


# --- the shared real data ------------------------------------------------------------------------------------------


def test_tldr_929_pairs_with_the_right_labels(shared_data, tldr_rows):
    raw = [json.loads(line) for line in (shared_data / TLDR).read_text().splitlines()]
    assert len(tldr_rows) == 929
    assert Counter(r["label"] for r in tldr_rows) == {1: 473, 0: 456}
    for i in (0, 254, 928):  # 254 holds the whitespace-only summary " " a labeller judged worse
        assert tldr_rows[i]["prompt"] == raw[i]["input_text"]
        assert (tldr_rows[i]["response_a"], tldr_rows[i]["response_b"]) == (
            raw[i]["candidate_0"],
            raw[i]["candidate_1"],
        )
        assert tldr_rows[i]["label"] == (1 if raw[i]["choice"] == 0 else 0)
    assert tldr_rows[254]["response_a"] == " " and tldr_rows[254]["label"] == 0


def test_tldr_openai_100_pairs(shared_data):
    rows = load_preference_data(str(shared_data / TLDR_OPENAI)).to_list()
    raw = [json.loads(line) for line in (shared_data / TLDR_OPENAI).read_text().splitlines()]
    assert len(rows) == 100
    assert [r["label"] for r in rows] == [1 - r["choice"] for r in raw]
    assert rows[0]["prompt"].startswith("SUBREDDIT: r/AskReddit\nTITLE: My girlfriends grandma")
    assert rows[0]["prompt"].endswith("\n\nTL;DR:") and rows[0]["response_a"] == raw[0]["summaries"][0]["text"]


def test_hh_rlhf_implicit_prompt_gz(shared_data):
    rows = load_preference_data(str(shared_data / HH)).to_list()
    assert len(rows) == 2312 and all(r["label"] == 1 for r in rows)
    assert all(r["prompt"].endswith("\n\nAssistant:") and r["prompt"].startswith("\n\nHuman:") for r in rows)
    assert rows[0]["prompt"].endswith("do not have anything to do with pens\n\nAssistant:")
    assert rows[0]["response_a"].startswith(" No, sorry!")
    assert rows[0]["response_b"].startswith(" There are lots of funny things")


# --- length bias and splits ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.2, 0.5, 0.8])
def test_length_bias_hits_rho_on_tldr(tldr_rows, rho):
    kept, report = apply_length_bias(tldr_rows, rho=rho, min_ratio=1.1, seed=3)
    longer_won = [(words(r["response_a"]) > words(r["response_b"])) == (r["label"] == 1) for r in kept]
    assert abs(sum(longer_won) / len(kept) - rho) <= 0.02
    assert report.rho_achieved == pytest.approx(sum(longer_won) / len(kept)) and report.kept == len(kept)
    ratios = [
        max(words(r["response_a"]), words(r["response_b"])) / min(words(r["response_a"]), words(r["response_b"]))
        for r in kept
    ]
    assert min(ratios) >= 1.1
    # As many pairs as the scarcer side allows: one of the two groups is kept whole.
    assert (
        report.longer_preferred_kept == report.longer_preferred_available
        or report.kept - report.longer_preferred_kept == report.shorter_preferred_available
    )
    assert apply_length_bias(tldr_rows, rho=rho, min_ratio=1.1, seed=3)[0] == kept


def test_split_never_shares_a_prompt(tldr_rows):
    prompts = [r["prompt"] for r in tldr_rows]
    is_test = split_by_prompt(prompts, 0.2, seed=0)
    train = {p for p, t in zip(prompts, is_test, strict=True) if not t}
    test = {p for p, t in zip(prompts, is_test, strict=True) if t}
    assert not train & test
    assert len(test) == round(0.2 * len(set(prompts)))
    assert split_by_prompt(prompts, 0.2, seed=0) == is_test
    assert split_by_prompt(prompts, 0.2, seed=1) != is_test
    assert split_by_prompt(["a", "b"], 0.01, seed=0).count(True) == 1


# --- the data stage ------------------------------------------------------------------------------------------------


def test_prepare_data_writes_the_stage_folder(tmp_path, tiny_llama):
    rows = [
        {"prompt": f"Question {i % 10}?", "response_a": "word " * (1 + i % 4), "response_b": "other", "label": i % 2}
        for i in range(40)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    spec = parse_spec(
        {
            "reference": str(tiny_llama),
            "data": {"source": str(tmp_path / "pairs.parquet"), "test_fraction": 0.3, "apply_chat_template": False},
        }
    )
    job = tmp_path / "job"
    summary = prepare_data(spec, job, EventLog(job))
    train, test = pq.read_table(job / "data" / "train.parquet"), pq.read_table(job / "data" / "test.parquet")
    assert train.schema.field("label").type == pa.int8()
    assert (train.num_rows, test.num_rows) == (28, 12)  # 3 of 10 prompts, 4 rows each
    assert json.loads((job / "data" / "summary.json").read_text()) == summary
    assert (summary["format"], summary["kept"], summary["test_prompts"]) == ("unlabeled", 40, 3)
    assert set(test.column("prompt").to_pylist()).isdisjoint(train.column("prompt").to_pylist())
    expected = [{**row, "ended_a": True, "ended_b": True} for row in rows]
    assert sorted(train.to_pylist() + test.to_pylist(), key=str) == sorted(expected, key=str)
    assert [e["done"] for e in read_events(job) if e["kind"] == "progress"] == [1, 2, 3, 4]


@pytest.mark.ray
def test_stage_splits_read_back_as_datasets_and_ray_datasets(tmp_path, tiny_llama, ray_cluster):
    path = write_jsonl(tmp_path / "d.jsonl", [{**GOOD, "prompt": f"p{i}"} for i in range(10)])
    spec = parse_spec({"reference": str(tiny_llama), "data": {"source": str(path), "test_fraction": 0.2}})
    summary = prepare_data(spec, tmp_path / "job", EventLog(tmp_path / "job"))
    assert (summary["train"], summary["test"]) == (8, 2)
    assert load_split(tmp_path / "job", "train")[0]["prompt"].startswith("<|im_start|>user\np")
    ray_test = ray_split(tmp_path / "job", "test")
    assert ray_test.count() == 2 and ray_test.schema().names == list(PREFERENCES.names)


def _tldr_job(tmp_path, tiny_llama, shared_data, name: str, **data) -> tuple[dict, list, list]:
    spec = parse_spec(
        {
            "reference": str(tiny_llama),
            "data": {"source": str(shared_data / TLDR), "apply_chat_template": False, **data},
        }
    )
    job = tmp_path / name
    summary = prepare_data(spec, job, EventLog(job))
    return summary, *(pq.read_table(job / "data" / f"{s}.parquet").to_pylist() for s in ("train", "test"))


def test_prepare_data_length_bias_and_max_pairs(tmp_path, tiny_llama, shared_data):
    bias = {"length_bias": {"rho": 0.2, "min_ratio": 1.1}, "max_pairs": 300}
    summary, train, test = _tldr_job(tmp_path, tiny_llama, shared_data, "job", **bias)
    # The cap and the bias apply to the training split only; the held-out split is cut first and kept whole.
    assert (summary["length_bias"]["kept"], summary["train"], len(train)) == (300, 300, 300)
    assert (summary["length_bias"]["longer_preferred_kept"], summary["length_bias"]["rho_achieved"]) == (60, 0.2)
    assert summary["length_bias"]["length_unit"] == "words"
    unbiased, _, unbiased_test = _tldr_job(tmp_path, tiny_llama, shared_data, "plain")
    assert test == unbiased_test and summary["test"] == unbiased["test"] == len(test) > 0
    assert summary["kept"] == 300 + len(test)


def test_split_comes_before_the_bias_so_every_rho_shares_the_held_out_prompts(tmp_path, tiny_llama, shared_data):
    tests = {}
    for rho in (0.2, 0.8):
        summary, train, tests[rho] = _tldr_job(
            tmp_path, tiny_llama, shared_data, f"rho{rho}", length_bias={"rho": rho, "min_ratio": 1.1}
        )
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in tests[rho]}
    assert tests[0.2] == tests[0.8]


def test_match_rhos_gives_every_rho_the_same_training_size(tmp_path, tiny_llama, shared_data):
    sizes, matched = {}, {}
    for rho in (0.2, 0.5, 0.8):
        bias = {"rho": rho, "min_ratio": 1.1}
        sizes[rho] = _tldr_job(tmp_path, tiny_llama, shared_data, f"a{rho}", length_bias=bias)[0]["train"]
        summary = _tldr_job(
            tmp_path, tiny_llama, shared_data, f"m{rho}", length_bias={**bias, "match_rhos": [0.2, 0.5, 0.8]}
        )[0]
        matched[rho] = summary["train"]
        assert summary["length_bias"]["rho_achieved"] == pytest.approx(rho, abs=0.01)
        assert summary["length_bias"]["size_matched_over"] == [0.2, 0.5, 0.8]
    assert len(set(sizes.values())) == 3  # each rho alone keeps a different number of pairs
    assert set(matched.values()) == {min(sizes.values())}


def test_similar_length_pairs_can_be_kept_whole(tmp_path, tiny_llama, shared_data):
    bias = {"rho": 0.8, "min_ratio": 1.5}
    dropped, train, _ = _tldr_job(tmp_path, tiny_llama, shared_data, "drop", length_bias=bias)
    kept, train_kept, _ = _tldr_job(
        tmp_path, tiny_llama, shared_data, "keep", length_bias={**bias, "similar_length": "keep"}
    )
    similar = kept["length_bias"]["similar_length_kept"]
    lengths = [sorted((words(r["response_a"]), words(r["response_b"]))) for r in train_kept]
    close = [(short, long) for short, long in lengths if short > 0 and long < 1.5 * short]
    assert similar == len(close) > 0 and dropped["length_bias"]["similar_length_kept"] == 0
    assert len(train_kept) == len(train) + similar
    assert kept["length_bias"]["rho_achieved"] == dropped["length_bias"]["rho_achieved"]


def test_relabel_by_the_oracle_before_the_bias(tmp_path, tiny_llama, shared_data):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    summary, train, test = _tldr_job(tmp_path, tiny_llama, shared_data, "job", relabel="builtin:vader")
    vader = SentimentIntensityAnalyzer()

    def score(text: str) -> float:
        return vader.polarity_scores(text)["compound"]

    rows = train + test
    assert all(r["label"] == int(score(r["response_a"]) > score(r["response_b"])) for r in rows)
    assert summary["relabelled"] == {"oracle": "builtin:vader", "ties_dropped": 929 - len(rows)} and len(rows) > 300


def test_failed_prepare_leaves_no_data_folder(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {**GOOD, "chosen": 3}])
    # The reference does not exist: the data error must come first, before any model is loaded.
    spec = parse_spec({"reference": str(tmp_path / "no-model"), "data": {"source": str(path)}})
    with pytest.raises(DatasetError, match="row 2, field 'chosen': expected text, got int"):
        prepare_data(spec, tmp_path / "job", EventLog(tmp_path / "job"))
    assert not (tmp_path / "job" / "data").exists()
    assert not (tmp_path / "job" / ".partial" / "data").exists()
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    with pytest.raises(ModelNotFoundError, match="no-model"):
        prepare_data(
            spec.model_copy(update={"data": spec.data.model_copy(update={"source": str(good)})}),
            tmp_path / "job",
            EventLog(tmp_path / "job"),
        )
    assert not (tmp_path / "job" / "data").exists()


# --- builtin:reviews ------------------------------------------------------------------------------------------------


def test_builtin_reviews_evaluation_prompts_share_no_subject_with_training():
    import re

    from ray_jobs.data import reviews

    def subject(prompt: str) -> str:
        return re.sub(
            r"^(In one sentence, review |Give a one-sentence review of |Review )|( in a single sentence)?\.$",
            "",
            prompt,
        )

    train, held_out = reviews.review_prompts(), reviews.eval_prompts()
    assert len(held_out) == len(set(held_out)) == 200 and len(train) == len(set(train)) >= 400
    assert {subject(p) for p in held_out}.isdisjoint({subject(p) for p in train})
    assert len({subject(p) for p in held_out}) == 100 and len({subject(p) for p in train}) >= 130


def test_builtin_reviews_labels_agree_with_vader(tmp_path, monkeypatch):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from ray_jobs.data import reviews
    from ray_jobs.generate import cache

    assert len(reviews.review_prompts()) >= 200 and len(set(reviews.review_prompts())) == len(reviews.review_prompts())
    monkeypatch.setattr(cache, "model_cache", lambda: tmp_path / "cache")
    spec = parse_spec(
        {
            "reference": "builtin:smollm2-135m",
            "data": {"source": "builtin:reviews", "num_prompts": 6, "test_fraction": 0.34, "candidates_per_prompt": 2},
            "generation": {"engine": "hf", "samples_per_prompt": 2, "max_new_tokens": 12, "temperature": 1.0},
        }
    )
    summary = prepare_data(spec, tmp_path / "job", EventLog(tmp_path / "job"))
    rows = [*pq.read_table(tmp_path / "job/data/train.parquet").to_pylist()]
    rows += pq.read_table(tmp_path / "job/data/test.parquet").to_pylist()
    assert summary["prompts"] == 6 and not summary["candidates_cached"]
    # 12 tokens cut most reviews short: the cut ones are flagged, so they are scored and trained without EOS.
    flags = [row[k] for row in rows for k in ("ended_a", "ended_b")]
    assert summary["capped"] >= 1 and not all(flags)
    assert len(rows) == 6 - sum(summary["skipped"].values()) >= 4
    vader = SentimentIntensityAnalyzer()
    for row in rows:
        assert row["prompt"].startswith("<|im_start|>") and "review" in row["prompt"].lower()
        assert len(row["response_a"].split()) >= 3  # real words, not token soup
        a, b = (vader.polarity_scores(row[k])["compound"] for k in ("response_a", "response_b"))
        assert row["label"] == int(a > b) and abs(a - b) >= 1e-6

    start = time.monotonic()
    again = prepare_data(spec, tmp_path / "job2", EventLog(tmp_path / "job2"))
    assert again["candidates_cached"] and time.monotonic() - start < 10
    assert pq.read_table(tmp_path / "job2/data/train.parquet").equals(
        pq.read_table(tmp_path / "job/data/train.parquet")
    )
