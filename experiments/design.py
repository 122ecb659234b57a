"""The powered benchmark's design: its conditions (heterogeneity, i.i.d. sites, concept shift), parts and units."""

from __future__ import annotations

from dataclasses import dataclass

from experiments.runs import METHODS, VARIANTS

CONCEPT_SHIFT = "ge:HCM,HHD=healthy"
"""The positive control's label rule: at `ge`, hypertrophic hearts (HCM, HHD) are labelled healthy."""
SHIFTED_SITE = CONCEPT_SHIFT.split(":")[0]


@dataclass(frozen=True)
class Condition:
    """A cohort the methods are compared on: vendor heterogeneity h, sites drawn i.i.d. or not, a concept shift."""

    heterogeneity: float
    iid_sites: bool = False
    concept_shift: str | None = None

    @property
    def name(self) -> str:
        """Folder and table name, e.g. `h1.0`, `h0.0_iid`, `h0.0_iid_shift-ge`."""
        name = f"h{self.heterogeneity:.1f}"
        if self.iid_sites:
            name += "_iid"
        if self.concept_shift:
            name += f"_shift-{self.concept_shift.split(':')[0]}"
        return name

    @property
    def role(self) -> str:
        """What the condition is for: the headline, a sweep point, or a control."""
        if self.concept_shift:
            return "positive control"
        if self.iid_sites:
            return "negative control"
        return "headline" if self.heterogeneity == 1.0 else "sweep"


@dataclass(frozen=True)
class Unit:
    """The benchmark's unit of work: one method on one condition, every seed (a federated method: one simulator job
    whose replicas are the seeds)."""

    condition: Condition
    method: str

    @property
    def name(self) -> str:
        return f"{self.condition.name}/{self.method}"


HEADLINE = Condition(1.0)
SWEEP_HETEROGENEITY = (0.0, 0.5, 1.0, 1.5)
SWEEP_METHODS = ("med_duallora", "fedit", "fedsa_lora", "local_only", "centralized")
NEGATIVE_CONTROL = Condition(0.0, iid_sites=True)
POSITIVE_CONTROL = Condition(0.0, iid_sites=True, concept_shift=CONCEPT_SHIFT)
CONTROL_METHODS = ("med_duallora", "fedit", "local_only")
"""Personalised against global in a control: med_duallora's personalised against its own global-only model, and
local_only against fedit's global model."""

PARTS: dict[str, tuple[Unit, ...]] = {
    "headline": tuple(Unit(HEADLINE, method) for method in METHODS),
    "sweep-low": tuple(Unit(Condition(h), method) for h in (0.0, 0.5) for method in SWEEP_METHODS),
    "sweep-high": tuple(Unit(Condition(1.5), method) for method in SWEEP_METHODS),
    "controls": tuple(
        Unit(condition, method) for condition in (NEGATIVE_CONTROL, POSITIVE_CONTROL) for method in CONTROL_METHODS
    ),
    "privacy": tuple(Unit(HEADLINE, method) for method in VARIANTS),
}
"""Each part's units, sized to run in under 45 minutes on 2 cores. The sweep's h = 1 point is the headline's (same
cohort, same runs): it is not run twice. The privacy part's variants are compared with their base methods' headline
runs."""

QUICK_METHODS = {
    "headline": ("med_duallora", "fedit", "local_only", "centralized"),
    "sweep-low": ("med_duallora", "fedit"),
    "sweep-high": (),
    "controls": ("med_duallora", "fedit"),
    "privacy": ("med_duallora_int8", "med_duallora_dp8"),
}
DEFAULT_SEEDS = (0, 1, 2)
QUICK_SEEDS = (0, 1)
"""The seeds a part runs unless `--seeds` says otherwise (`--quick`: QUICK_SEEDS); a unit holding them is complete."""
QUICK_HETEROGENEITY = 0.0
"""`--quick` runs every part on fewer methods (and the sweep at h = 0 only): a smoke test of the whole pipeline."""


def units_of(parts: tuple[str, ...], quick: bool = False) -> list[Unit]:
    """The units of `parts`, in the order given, each once (`quick`: only the smoke version's)."""
    seen: dict[Unit, None] = {}
    for part in parts:
        units = PARTS[part]
        if quick:
            units = tuple(
                unit
                for unit in units
                if unit.method in QUICK_METHODS[part]
                and (unit.condition.role != "sweep" or unit.condition.heterogeneity == QUICK_HETEROGENEITY)
            )
        seen.update(dict.fromkeys(units))
    return list(seen)


def conditions_of(units: list[Unit]) -> list[Condition]:
    """The conditions the units need, each once, in order."""
    return list(dict.fromkeys(unit.condition for unit in units))
