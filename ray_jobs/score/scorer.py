"""Every number the losses need about a text, computed once: π_ref's log-probability and each member's reward.

One Ray Data actor pool over the distinct (prompt, response) texts; every actor holds π_ref and all K members,
each loaded once. A pool per model would pay the actor start and the data pass K+1 times, which dominates at the
sizes one machine scores.
"""

from __future__ import annotations

import numpy as np

from ray_jobs.events import EventLog
from ray_jobs.names import Precision
from ray_jobs.precision import autocast


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Scorer:
    """Ray Data actor holding π_ref and every ensemble member."""

    def __init__(
        self,
        reference: str | None,
        members: list[tuple[str, int]],
        ref_max_length: int,
        batch_size: int,
        ref_precision: Precision = "fp32",
        threads: int | None = None,
        member_precision: Precision = "fp32",
    ):
        """`members`: (folder, token budget to score at) of each reward model, run under `member_precision`;
        π_ref's log-probs are computed under `ref_precision`, the policy's own compute precision
        (ray_jobs.precision). `threads`: torch's intra-op threads here (Ray gives a one-CPU actor one, which left a
        lone scorer on one core of the node)."""
        import torch

        from ray_jobs.models.registry import load_causal_lm, load_reward_model

        if threads is not None:
            torch.set_num_threads(threads)

        device = _device()
        self.reference = None
        if reference is not None:
            self.reference, self.tokenizer = load_causal_lm(reference, device=device)
            self.reference.eval()
        self.members = []
        for path, max_length in members:
            model, tokenizer = load_reward_model(path)
            self.members.append((model.to(device).eval(), tokenizer, max_length))
        self.ref_max_length, self.batch_size, self.ref_precision = ref_max_length, batch_size, ref_precision
        self.member_precision = member_precision

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ray_jobs.models.logps import response_logps
        from ray_jobs.models.reward import score_pairs

        prompts, responses = [str(p) for p in batch["prompt"]], [str(r) for r in batch["response"]]
        ended = [bool(e) for e in batch["ended"]]
        # π_ref samples need no rewards: only rows flagged `reward` go through the members.
        wanted = np.flatnonzero(batch["reward"])
        rewards = np.full((len(prompts), len(self.members)), np.nan)
        for k, (model, tokenizer, max_length) in enumerate(self.members):
            if wanted.size:
                with autocast(self.member_precision, model.device):
                    member_rewards = score_pairs(
                        model,
                        tokenizer,
                        [prompts[i] for i in wanted],
                        [responses[i] for i in wanted],
                        batch_size=self.batch_size,
                        max_length=max_length,
                    )
                rewards[wanted, k] = member_rewards.double().numpy()
        ref = np.full(len(prompts), np.nan)
        if self.reference is not None:
            with autocast(self.ref_precision, self.reference.device):
                ref = response_logps(
                    self.reference, self.tokenizer, prompts, responses, self.ref_max_length, self.batch_size, ended
                ).numpy()
        import torch

        out = {"index": batch["index"], "ref_logp": ref, "threads": np.full(len(prompts), torch.get_num_threads())}
        if self.members:  # a [B, 0] tensor column is more than Ray Data's tensor type accepts
            out["rewards"] = rewards
        return out


def score_texts(
    reference: str | None,
    members: list[tuple[str, int]],
    texts: list[tuple[str, str, bool]],
    needs_reward: list[bool],
    *,
    ref_max_length: int,
    batch_size: int,
    replicas: int,
    events: EventLog | None = None,
    ref_precision: Precision = "fp32",
    member_precision: Precision = "fp32",
) -> tuple[np.ndarray, np.ndarray]:
    """π_ref log-prob [N] and member rewards [N, K] of each (prompt, response, ended); NaN where not asked for
    (no reference, or `needs_reward` false). `members`: (folder, token budget) of each reward model, run under
    `member_precision`."""
    from ray_jobs.cluster import current_resources
    from ray_jobs.pools import run_indexed

    ref = np.full(len(texts), np.nan)
    rewards = np.full((len(texts), len(members)), np.nan)

    threads: set[int] = set()

    def place(batch: dict[str, np.ndarray]) -> None:
        threads.update(int(t) for t in batch["threads"])
        index = batch["index"]
        ref[index] = batch["ref_logp"]
        if members:
            rewards[index] = np.asarray(batch["rewards"], dtype=np.float64).reshape(len(index), len(members))

    def progress(done: int, total: int) -> None:
        if events is not None:
            events.progress("score", done, total, what="texts scored")

    run_indexed(
        Scorer,
        dict(
            reference=reference,
            members=members,
            ref_max_length=ref_max_length,
            batch_size=batch_size,
            ref_precision=ref_precision,
            member_precision=member_precision,
            # Each replica reserves one CPU; together they compute on the node's CPUs, shared evenly.
            threads=max(1, int(current_resources().max_node_cpus // replicas)),
        ),
        [
            {"prompt": p, "response": r, "ended": e, "reward": w}
            for (p, r, e), w in zip(texts, needs_reward, strict=True)
        ],
        replicas=replicas,
        batch_size=batch_size,
        on_batch=place,
        on_progress=progress,
    )
    if events is not None:
        events.emit(
            "log",
            "score",
            message=f"scored with {max(threads, default=0)} torch thread(s) per replica",
            threads=max(threads, default=0),
        )
    return ref, rewards
