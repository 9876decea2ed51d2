"""The run's health monitor: says, in one sentence naming the likely cause and the fix, when a
GRPO run cannot learn. Each check reads the per-step metrics record; a warning is raised once
per symptom (again only after the symptom went away and came back).
"""

from dataclasses import dataclass, field


@dataclass
class HealthMonitor:
    window: int = 10                   # steps a symptom must last
    entropy_floor: float = 0.02        # nats per token
    kl_spike: float = 1.0              # mean per-token KL
    history: list[dict] = field(default_factory=list)
    active: set = field(default_factory=set)

    def _last(self, key: str) -> list[float]:
        return [r[key] for r in self.history[-self.window:] if r.get(key) is not None]

    def symptoms(self) -> dict[str, str]:
        last, n, found = self.history[-1], self.window, {}
        full = len(self.history) >= n
        if full and all(v >= 1.0 for v in self._last("zero_spread_frac")):
            found["zero_spread"] = (
                f"every group had zero reward spread for {n} steps, so there is nothing to learn: "
                "the task is too hard or too easy for this model, or answers are not being extracted "
                "(check rollouts.jsonl); change the task difficulty, the model or the reward"
            )
        if full and sum(self._last("truncation_rate")) / n > 0.5:
            found["truncation"] = (f"over half of the responses hit max_new_tokens for {n} steps: "
                                   "raise max_new_tokens, or penalise length")
        recent_rewards = [r["reward_mean"] for r in self.history[-3 * n:]]
        if len(self.history) >= 3 * n and max(recent_rewards) - min(recent_rewards) < 1e-6:
            found["flat_reward"] = (
                f"the mean reward has not moved for {3 * n} steps: "
                "the learning rate may be too low or the reward constant; check lr and the reward components"
            )
        entropies = self._last("entropy")
        if full and entropies and max(entropies) < self.entropy_floor and last.get("pass_rate", 1) < 0.99:
            found["entropy_collapse"] = (
                f"the policy's entropy fell below {self.entropy_floor} nats/token while the pass rate is "
                f"{last.get('pass_rate', 0):.2f}: it stopped exploring; lower lr or raise temperature / clip_high"
            )
        if last.get("kl") is not None and last["kl"] > self.kl_spike:
            found["kl_spike"] = (
                f"KL to the reference jumped to {last['kl']:.3f}: the policy is moving too fast; lower lr or raise beta"
            )
        if last.get("skipped_update"):
            found["non_finite"] = (
                "the loss or gradient was NaN/inf, so the update was skipped: lower lr, or check the reward for NaN"
            )
        return found

    def update(self, record: dict) -> list[str]:
        """Add one step's metrics; return the warnings that are new this step."""
        self.history.append(record)
        found = self.symptoms()
        new = [msg for key, msg in found.items() if key not in self.active]
        self.active = set(found)
        return new
