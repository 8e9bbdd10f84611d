"""The ``CostBudget`` kind: what compute and tokens cost, and how much each model, API key or team may spend.

Budgets reuse the name / bound / window shape of Flagger's metrics (``{name, max, interval}``)::

    budgets:
      - {name: research-monthly, team: research, window: month, soft: 800, hard: 1000}

Spend over ``soft`` notifies; at ``hard`` the gateway refuses the key with 429 ``insufficient_quota``
(``hard_action: refuse``), reserving each request's estimated cost before it runs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from slipway.policies.kinds import Document, Strict, register_kind

Window = Literal["day", "week", "month"]


class AcceleratorPrice(Strict):
    name: str = Field(min_length=1, description="Accelerator type as recorded on deployments, e.g. nvidia-h100.")
    gpu_hour: float = Field(ge=0, le=1000, description="US dollars per GPU-hour, 0-1000.")


class TokenPrice(Strict):
    """A per-token price: the bill of an external provider, or the chargeback rate of a self-hosted model."""

    model: str = Field(min_length=1, description="Model name as it appears in usage records.")
    provider: str | None = Field(
        default=None,
        description="External provider (e.g. openai). Set: the model is billed per token and has no GPUs. "
        "Unset: a chargeback rate used only to estimate requests for budget enforcement. Default unset.",
    )
    prompt_per_1k: float = Field(ge=0, le=1000, description="US dollars per 1000 prompt tokens, 0-1000.")
    completion_per_1k: float = Field(ge=0, le=1000, description="US dollars per 1000 completion tokens, 0-1000.")


class Pricing(Strict):
    accelerators: list[AcceleratorPrice] = Field(
        default_factory=list, description="$/GPU-hour by accelerator type. Default none (default_gpu_hour applies)."
    )
    default_gpu_hour: float = Field(
        default=2.0, ge=0, le=1000, description="$/GPU-hour of an accelerator not listed, 0-1000. Default 2.0."
    )
    cpu_hour: float = Field(
        default=0.05, ge=0, le=100, description="$/CPU-hour of a replica without GPUs, 0-100. Default 0.05."
    )
    tokens: list[TokenPrice] = Field(
        default_factory=list, description="Per-token prices of external models and chargeback rates. Default none."
    )
    default_per_1k: float = Field(
        default=0.0,
        ge=0,
        le=1000,
        description="$/1000 tokens used to estimate a request to a model without a token price. Default 0.",
    )

    @model_validator(mode="after")
    def names_are_unique(self) -> Pricing:
        for what, names in (
            ("accelerator", [a.name for a in self.accelerators]),
            ("token price model", [t.model for t in self.tokens]),
        ):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what} listed twice: {', '.join(dupes)}")
        return self

    def gpu_hour(self, accelerator: str | None) -> float:
        for a in self.accelerators:
            if a.name == accelerator:
                return a.gpu_hour
        return self.default_gpu_hour

    def token_price(self, model: str) -> TokenPrice | None:
        return next((t for t in self.tokens if t.model == model), None)

    def external(self) -> list[TokenPrice]:
        return [t for t in self.tokens if t.provider is not None]

    def estimate(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        """Dollars a request of that size costs at the model's token price (or ``default_per_1k``)."""
        p = self.token_price(model)
        if p is None:
            return (prompt_tokens + completion_tokens) * self.default_per_1k / 1000.0
        return (prompt_tokens * p.prompt_per_1k + completion_tokens * p.completion_per_1k) / 1000.0


class Budget(Strict):
    """One spending bound over a window, for exactly one of a model, an API key or a team."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,127}$", description="Unique name of the budget.")
    model: str | None = Field(default=None, description="Model whose spend is bounded. Default none.")
    key: str | None = Field(default=None, description="API key name whose spend is bounded. Default none.")
    team: str | None = Field(default=None, description="Team whose keys' spend is bounded. Default none.")
    window: Window = Field(default="month", description="Calendar period in UTC: day, week or month. Default month.")
    soft: float | None = Field(
        default=None, gt=0, description="US dollars; spend at or above it notifies. Default none."
    )
    hard: float | None = Field(
        default=None, gt=0, description="US dollars; at it the hard_action applies. Default none."
    )
    hard_action: Literal["refuse", "notify"] = Field(
        default="refuse",
        description="refuse: the gateway answers 429 insufficient_quota until the window ends; notify: only tell. "
        "Default refuse.",
    )

    @model_validator(mode="after")
    def exactly_one_scope_and_ordered_bounds(self) -> Budget:
        scopes = [s for s in (self.model, self.key, self.team) if s is not None]
        if len(scopes) != 1:
            raise ValueError("a budget names exactly one of model, key or team")
        if self.soft is None and self.hard is None:
            raise ValueError("a budget needs soft, hard or both")
        if self.soft is not None and self.hard is not None and self.soft > self.hard:
            raise ValueError(f"soft {self.soft} is greater than hard {self.hard}")
        return self

    @property
    def scope(self) -> tuple[str, str]:
        """``("model"|"key"|"team", name)``."""
        if self.model is not None:
            return "model", self.model
        if self.key is not None:
            return "key", self.key
        return "team", str(self.team)


@register_kind
class CostBudget(Document):
    """Prices of compute and tokens, and the budgets that bound spend."""

    kind: Literal["CostBudget"] = "CostBudget"
    currency: Literal["USD"] = Field(default="USD", description="Currency of every price and bound. Default USD.")
    pricing: Pricing = Field(default_factory=Pricing, description="Prices. Default: the Pricing defaults.")
    budgets: list[Budget] = Field(default_factory=list, description="Spending bounds. Default none.")
    webhook: str | None = Field(
        default=None,
        pattern=r"^(https?|vault)://",
        description="Where breaches are posted (Slack-compatible JSON); may be a vault:// reference. Default: log.",
    )

    @model_validator(mode="after")
    def budget_names_are_unique(self) -> CostBudget:
        names = [b.name for b in self.budgets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"budget name used twice: {', '.join(dupes)}")
        return self

    def budgets_for(self, *, key: str | None, team: str | None, model: str | None) -> list[Budget]:
        """The budgets a request by ``key`` (of ``team``) to ``model`` counts against."""
        want = {("key", key), ("team", team), ("model", model)}
        return [b for b in self.budgets if b.scope in want and b.scope[1] is not None]
