"""Reward models users bring as ensemble members: one saved by TRL's RewardTrainer joins a trained member in a real
job on the session's Ray cluster, read as TRL trained it, and the pairs carry its scores; an ensemble of given
members trains nothing; a model that is not a one-output reward model is refused naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from support.data import synthetic_pairs, write_job_data, write_prefs

from ray_jobs.ensemble.given import check_given
from ray_jobs.ensemble.stage import run as run_ensemble
from ray_jobs.ensemble.train import load_pairs
from ray_jobs.events import EventLog, read_events
from ray_jobs.layout import JobLayout
from ray_jobs.pipeline import run_job
from ray_jobs.spec import EnsembleSpec, SpecError, parse_spec


def _direct_scores(model_dir: Path, prompts: list[str], responses: list[str], max_length: int) -> np.ndarray:
    """What the model computes with transformers alone, not through rmdistill's registry."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ray_jobs.models.reward import score_pairs

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return score_pairs(model, tokenizer, prompts, responses, max_length=max_length).double().numpy()


@pytest.fixture(scope="module")
def trl_reward_model(tmp_path_factory, tiny_bert) -> Path:
    """A tiny:bert reward model trained for a few steps by TRL's RewardTrainer and saved as TRL saves it."""
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    out = tmp_path_factory.mktemp("trl-rm")
    frame = synthetic_pairs(32, seed=5)
    a_wins = frame["label"].astype(int) == 1
    rows = {
        "prompt": frame["prompt"].tolist(),
        "chosen": np.where(a_wins, frame["response_a"], frame["response_b"]).tolist(),
        "rejected": np.where(a_wins, frame["response_b"], frame["response_a"]).tolist(),
    }
    trainer = RewardTrainer(
        model=AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=1),
        processing_class=AutoTokenizer.from_pretrained(tiny_bert),
        train_dataset=datasets.Dataset.from_dict(rows),
        args=RewardConfig(
            output_dir=str(out / "run"),
            max_steps=6,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            max_length=64,
            eos_token="[SEP]",  # TRL ends every text with EOS; a BERT tokenizer names none
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
        ),
    )
    trainer.train()
    trainer.save_model(str(out / "model"))
    first = trainer.train_dataset[0]  # TRL's own tokenization of the first pair: what the model was trained on
    assert first["prompt"] == rows["prompt"][0]
    example = {"prompt": rows["prompt"][0], "chosen": rows["chosen"][0], "chosen_ids": list(first["chosen_ids"])}
    (out / "first-example.json").write_text(json.dumps(example))
    return out / "model"


def _trl_scores(model_dir: Path, prompts: list[str], responses: list[str]) -> np.ndarray:
    """What the model computes, one pair at a time, on the stream TRL's RewardTrainer trained it on: the one text
    prompt + response + EOS through its tokenizer (transformers alone, nothing of rmdistill)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        return np.array(
            [
                model(**tokenizer(p + r + tokenizer.eos_token, return_tensors="pt")).logits[0, 0].item()
                for p, r in zip(prompts, responses, strict=True)
            ]
        )


def test_text_input_is_exactly_the_token_stream_trl_trained_on(trl_reward_model):
    from ray_jobs.models.registry import load_reward_model
    from ray_jobs.models.reward import INPUT_KEY, reward_inputs

    example = json.loads((trl_reward_model.parent / "first-example.json").read_text())
    _, tokenizer = load_reward_model(str(trl_reward_model))
    as_pair = reward_inputs(tokenizer, [example["prompt"]], [example["chosen"]], 64)["input_ids"][0].tolist()
    assert as_pair != example["chosen_ids"]  # an encoder's text pair is not what TRL fed it
    tokenizer.init_kwargs[INPUT_KEY] = "text"
    as_text = reward_inputs(tokenizer, [example["prompt"]], [example["chosen"]], 64)["input_ids"][0].tolist()
    assert as_text == example["chosen_ids"]


def _job_spec(source: Path, model: Path) -> dict:
    return {
        "name": "given",
        "reference": "tiny:llama",
        "data": {"source": str(source), "test_fraction": 0.25},
        "ensemble": {
            "size": 2,
            "backbone": "tiny:bert",
            "members": [{"model": str(model), "input": "text"}],
            "epochs": 1,
            "batch_size": 8,
            "max_length": 64,
            "cpus_per_worker": 0.5,
        },
        "generation": {"engine": "hf", "samples_per_prompt": 2, "max_new_tokens": 6, "max_prompts": 4},
        "score": {"batch_size": 16, "precision": "fp32"},  # its rewards are compared with direct calls to 1e-4
        "distill": {"loss": "e-dpo", "max_steps": 2, "batch_size": 4, "lr": 1e-3, "max_length": 96},
        "evaluate": {"oracle": None},
    }


@pytest.mark.ray
def test_a_trl_reward_model_joins_a_trained_member_and_the_pairs_carry_its_scores(
    ray_cluster, tmp_path, trl_reward_model
):
    spec = parse_spec(_job_spec(write_prefs(tmp_path / "prefs.jsonl"), trl_reward_model))
    job = tmp_path / "job"
    summaries = run_job(spec, job)
    assert summaries["distill"]["steps"] == 2
    layout = JobLayout(job)

    manifest = json.loads(layout.manifest.read_text())
    assert manifest["given"] == [0] and manifest["trained"] == [1]
    assert [m["source"] for m in manifest["members"]] == ["given", "trained"]
    assert manifest["members"][0]["backbone"] == str(trl_reward_model) and manifest["members"][0]["epochs_run"] == 0
    assert manifest["members"][1]["epochs_run"] == 1
    assert manifest["members"][0]["input"] == "text"

    # Held-out accuracy of the given member, measured as a trained member's is: from its own scores of the test split.
    test = load_pairs(layout.test)
    r_w = _trl_scores(trl_reward_model, test["prompt"], test["chosen"])
    r_l = _trl_scores(trl_reward_model, test["prompt"], test["rejected"])
    assert manifest["accuracies"][0] == pytest.approx(float(np.mean(r_w > r_l)))

    # The score stage used the given model itself: member 0's reward of every pair text is what it computes directly.
    pairs = pd.read_parquet(layout.pairs)
    assert set(pairs["source"]) == {"generated", "dataset"}
    for side in ("a", "b"):
        rewards = np.array(pairs[f"rewards_{side}"].tolist())
        assert rewards.shape == (len(pairs), 2)
        direct = _trl_scores(trl_reward_model, pairs["prompt"].tolist(), pairs[f"response_{side}"].tolist())
        np.testing.assert_allclose(rewards[:, 0], direct, atol=1e-4)
        assert not np.allclose(rewards[:, 1], direct, atol=1e-3)  # the trained member is another model


@pytest.mark.ray
def test_an_ensemble_of_given_members_trains_nothing(ray_cluster, tmp_path, trl_reward_model, tiny_bert):
    job = write_job_data(tmp_path / "job", n_train=8, n_test=8)
    spec = parse_spec(
        {"ensemble": {"size": 2, "members": [{"model": str(trl_reward_model)}, {"model": str(tiny_bert)}]}}
    )
    summary = run_ensemble(spec, job, EventLog(job))
    manifest = json.loads(JobLayout(job).manifest.read_text())
    assert manifest["trained"] == [] and manifest["given"] == [0, 1]
    assert summary["size"] == 2 and len(summary["accuracies"]) == 2
    events = list(read_events(job))
    assert not [e for e in events if e.get("event") == "epoch_done"]  # no member went through a training epoch
    assert sorted(e["member"] for e in events if e.get("event") == "member_finished") == [0, 1]
    assert all(e["source"] == "given" for e in events if e.get("event") == "member_finished")
    # Each given model is copied into the ensemble, so the job keeps what it was scored with.
    test = load_pairs(JobLayout(job).test)
    copied = _direct_scores(job / "ensemble" / "member-1", test["prompt"], test["chosen"], 256)
    np.testing.assert_allclose(copied, _direct_scores(tiny_bert, test["prompt"], test["chosen"], 256), atol=1e-5)


def test_a_given_member_cannot_also_be_trained():
    with pytest.raises(SpecError) as err:
        parse_spec({"ensemble": {"size": 2, "members": [{"model": "/rm", "lr": 1e-4}]}})
    assert err.value.errors[0]["field"] == "ensemble.members.0"
    assert "lr would train it" in err.value.errors[0]["message"]
    with pytest.raises(SpecError) as err:
        parse_spec({"ensemble": {"size": 2, "members": [{"input": "text"}]}})
    assert err.value.errors[0]["field"] == "ensemble.members.0"
    assert "input applies to a given model" in err.value.errors[0]["message"]


def test_given_members_that_are_not_reward_models_are_refused_naming_the_field(tmp_path, tiny_llama, tiny_bert):
    from transformers import AutoConfig

    two_labels = tmp_path / "classifier"
    config = AutoConfig.from_pretrained(tiny_bert)
    config.num_labels = 2
    config.save_pretrained(two_labels)
    spec = EnsembleSpec(
        size=4,
        members=[{"model": str(tiny_bert)}, {"model": str(tiny_llama)}, {"model": str(two_labels)}, {"model": "/no"}],
    )
    with pytest.raises(SpecError) as err:
        check_given(spec)
    by_field = {e["field"]: e["message"] for e in err.value.errors}
    assert set(by_field) == {f"ensemble.members.{k}.model" for k in (1, 2, 3)}  # member 0 is a reward model
    assert "LlamaForCausalLM, not a sequence-classification" in by_field["ensemble.members.1.model"]
    assert "2 outputs" in by_field["ensemble.members.2.model"]
    assert "does not exist" in by_field["ensemble.members.3.model"]
