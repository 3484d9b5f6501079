"""Quality gates: each align stage must beat the one before it on the test split, by more than its noise.

- SFT against the base model, on test completion NLL per token (lower is better);
- the reward model against chance (0.5), on test pairwise accuracy;
- PPO against SFT, on the mean RM reward of test answers, with the KL to SFT under a bound and an
  independent metric that the RM was not trained on (ROUGE-L F of the answer against the test
  reference) not worse.

"Beats" means by more than `z` standard errors of the difference, so a lucky draw on a small test
split does not pass. A gate's entry is what `evaluation.json` records under `gates`:
`{"metric", "baseline", "value", "se", "passed"}`, and PPO's also `kl` and `independent`.

    gate = sft_gate(metrics, GateOptions())
    state = stage_state(gate, GateOptions(gates="warn"), result)   # a named Prefect state
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, Field

from storage.errors import AlignflowError


GateMode = Literal["fail", "warn", "off"]
GATES_HELP = ("What a stage that does not beat its predecessor on the test split does. fail: it ends Failed (named "
              "Regressed) and the run stops there; warn: it ends Completed, named Regressed, and the run goes on; off: "
              "gates are computed and reported only.")


class GateOptions(BaseModel):
    """What a stage must show on the test split (the align config carries these fields itself)."""

    gates: GateMode = Field("fail", description=GATES_HELP)
    gate_z: float = Field(2.0, ge=0.0, description="How many standard errors of the difference a stage must win by.")
    max_kl: float = Field(10.0, gt=0.0, description="PPO: the largest mean KL to the SFT model (nats per answer) that passes.")


class QualityGateFailed(AlignflowError, RuntimeError):
    """A stage did not beat its predecessor on the test split and `gates` is `fail`: the run stops there."""


class IndependentMetric(BaseModel):
    metric: str
    sft: float
    ppo: float
    se: float | None = None


class Gate(BaseModel):
    """One stage's comparison with its predecessor on the test split."""

    stage: str
    metric: str
    baseline: float
    value: float
    se: float | None
    passed: bool
    reason: str = ""
    kl: float | None = None
    independent: IndependentMetric | None = None

    def entry(self) -> dict[str, Any]:
        """The `gates` entry of evaluation.json."""
        keys = {"metric", "baseline", "value", "se", "passed"} | ({"kl", "independent"} if self.stage not in ("sft", "rm") else set())
        return self.model_dump(include=keys)

    def row(self) -> dict[str, Any]:
        """One row of the gates table artifact."""
        return {"stage": self.stage, "metric": self.metric, "baseline": round(self.baseline, 4), "value": round(self.value, 4),
                "se": None if self.se is None else round(self.se, 4), "passed": self.passed, "why": self.reason}


def _finite(x: float | None) -> float:
    return x if x is not None and math.isfinite(x) else 0.0


def sft_gate(metrics: dict[str, Any], options: GateOptions) -> Gate:
    base, sft, se = metrics["test_nll_base"], metrics["test_nll_sft"], metrics["test_nll_diff_se"]
    passed = base - sft > options.gate_z * _finite(se)
    reason = (f"test NLL {sft:.3f} vs base {base:.3f}: " + ("lower" if sft < base else "not lower")
              + f" by {base - sft:+.3f} (needs > {options.gate_z:g} SE = {options.gate_z * _finite(se):.3f})")
    return Gate(stage="sft", metric="test_nll", baseline=base, value=sft, se=se, passed=passed, reason=reason)


def reward_gate(metrics: dict[str, Any], options: GateOptions) -> Gate:
    accuracy, se = metrics["test_accuracy"], metrics["test_accuracy_se"]
    passed = accuracy - 0.5 > options.gate_z * _finite(se)
    reason = f"test accuracy {accuracy:.3f} ± {_finite(se):.3f} on {metrics.get('test_pairs')} pairs vs chance 0.5"
    return Gate(stage="rm", metric="test_accuracy", baseline=0.5, value=accuracy, se=se, passed=passed, reason=reason)


def policy_gate(stage: str, evaluation: dict[str, Any], options: GateOptions) -> Gate:
    """PPO (or DPO, RLOO) against SFT on the evaluation's paired test comparison."""
    row = evaluation["models"][stage]
    sft = evaluation["models"]["sft"]
    gain, gain_se = row["reward_gain"], row["reward_gain_se"]
    independent = IndependentMetric(metric="rouge_l_to_reference", sft=sft["rouge_l_mean"], ppo=row["rouge_l_mean"],
                                    se=row["rouge_l_gain_se"])
    kl = row["kl_from_reference"]
    checks = {
        f"reward gain {gain:+.3f} > {options.gate_z:g} SE ({options.gate_z * _finite(gain_se):.3f})": gain > options.gate_z * _finite(gain_se),
        f"KL {kl:.2f} <= {options.max_kl:g}": kl is not None and kl <= options.max_kl,
        f"ROUGE-L to reference {independent.sft:.3f} -> {independent.ppo:.3f} not worse by > {options.gate_z:g} SE":
            independent.ppo - independent.sft >= -options.gate_z * _finite(independent.se),
    }
    reason = "; ".join(("ok: " if ok else "FAILED: ") + text for text, ok in checks.items())
    return Gate(stage=stage, metric="test_reward", baseline=sft["reward_mean"], value=row["reward_mean"], se=gain_se,
                passed=all(checks.values()), reason=reason, kl=kl, independent=independent)


def stage_state(gate: Gate, options: GateOptions, result: Any):
    """The stage's final Prefect state: Completed when it passed (or gates are off), else named Regressed,
    Completed under `warn` and Failed under `fail`. The result rides along in both."""
    from prefect.states import Completed, Failed

    message = f"{gate.stage} gate {'passed' if gate.passed else 'FAILED'}: {gate.reason}"
    if gate.passed:
        return Completed(data=result, name="Passed", message=message)
    if options.gates == "off":
        return Completed(data=result, message=message)
    if options.gates == "warn":
        return Completed(data=result, name="Regressed", message=message)
    return Failed(data=result, name="Regressed", message=message)
