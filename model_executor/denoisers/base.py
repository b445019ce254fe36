"""The contract of a model family's denoiser: its unmasking policies (names, default, validation),
its transfer schedule, its logits shift and its unmasking step.

The engine asks a denoiser, on the driver, which policy a request uses and how many tokens each
step commits; rank 0's worker asks it, where the logits are, which positions to commit and with
which tokens. The engine never branches on a family's name: all that differs lives here.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from model_executor.step_input import RequestSampling


class Denoiser(ABC):
    name: ClassVar[str]                  # the family, as errors name it ("not a llada policy")
    policies: ClassVar[tuple[str, ...]]  # unmasking policies, by the name SamplingParams.unmasking takes
    policy_key: ClassVar[str]            # generation_config.json key naming the checkpoint's default
    default_policy: ClassVar[str]        # the reference code's default when the checkpoint names none
    logits_shift: ClassVar[int] = 0      # logits of position i come from hidden row i - logits_shift
    # Policies whose commit count unmask() decides from the logits, against SamplingParams.threshold
    # (Fast-dLLM's confidence-threshold decoding): the schedule gives only the minimum to commit, and
    # a block ends as soon as it has no mask left, so a request may take fewer steps than `steps`.
    threshold_policies: ClassVar[tuple[str, ...]] = ()

    def resolve_policy(self, params: Any, generation_config: dict) -> str:
        """The policy a request runs (its own, else the checkpoint's, else the reference's), after
        checking it and the family's settings; ValueError naming the bad value. `params` is a
        SamplingParams (read by attribute: model_executor does not import the engine)."""
        policy = params.unmasking
        if policy is None:   # a key present but null counts as absent
            policy = generation_config.get(self.policy_key) or self.default_policy
        if policy not in self.policies:
            source = "SamplingParams.unmasking" if params.unmasking is not None else \
                f"generation_config.json {self.policy_key}"
            raise ValueError(f"{source}={policy!r} is not a {self.name} policy; choose from {self.policies}")
        if policy in self.threshold_policies and params.threshold is None:
            raise ValueError(f"SamplingParams.threshold=None: the {policy!r} policy needs a threshold")
        if policy not in self.threshold_policies and params.threshold is not None:
            raise ValueError(f"SamplingParams.threshold={params.threshold!r} does not apply to the "
                             f"{policy!r} policy")
        self.check(params, policy)
        return policy

    def plan(self, num_masked: int, step_in_block: int, params: Any, policy: str) -> tuple[int, float]:
        """transfer() for the request's policy. A threshold policy commits at least one token a step
        and, at the block's last allotted step (`steps_per_block`), all that remain, as the
        reference schedule's last step does; unmask() may commit more (those above the threshold)."""
        if policy in self.threshold_policies:
            return (num_masked if step_in_block == params.steps_per_block - 1 else 1), 0.0
        return self.transfer(num_masked, step_in_block, params)

    def check(self, params: Any, policy: str) -> None:
        """Family-specific settings beyond SamplingParams' own checks (e.g. LLaDA refuses Dream's
        alg_temp); ValueError naming the value."""

    @abstractmethod
    def transfer(self, num_masked: int, step_in_block: int, params: Any) -> tuple[int, float]:
        """(tokens to commit, per-position commit probability) at this step of the current block,
        which still has `num_masked` masked positions. A step with (0, 0.0) commits nothing."""

    @abstractmethod
    def unmask(self, logits: torch.Tensor, s: RequestSampling,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Given float32 logits [M, vocab] of the block's masked positions (canvas order), return
        (indices into those M, chosen token ids) to commit. Runs on the device of the logits."""


def threshold_pick(conf: torch.Tensor, num_min: int, threshold: float) -> torch.Tensor:
    """Fast-dLLM v1's rule: every position whose confidence is >= threshold, and at least the
    `num_min` most confident (indices into conf). Those above the threshold are the top of the
    order, so this is one top-k."""
    k = max(num_min, int((conf >= threshold).sum()))
    return torch.topk(conf, k).indices
