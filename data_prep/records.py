"""Common subject record, input errors, pathology codes, the binary label rule and the vendor → client rule."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Unified label map of the prepared data (CineMA / ACDC convention).
RV_LABEL, MYO_LABEL, LV_LABEL = 1, 2, 3
ACDC_LABEL_MAP: dict[int, int] = {1: RV_LABEL, 2: MYO_LABEL, 3: LV_LABEL}
MNMS_LABEL_MAP: dict[int, int] = {1: LV_LABEL, 2: MYO_LABEL, 3: RV_LABEL}

# Pathology codes each dataset may use (reference-data.md §1-3).
KNOWN_CODES: dict[str, frozenset[str]] = {
    "acdc": frozenset({"NOR", "MINF", "DCM", "HCM", "RV"}),
    "mnms": frozenset({"NOR", "HCM", "DCM", "HHD", "ARV", "AHS", "IHD", "LV", "Other"}),
    "mnms2": frozenset({"NOR", "LV", "HCM", "ARR", "FALL", "CIA", "TRI", "RV"}),
}
CODE_ALIASES: dict[str, dict[str, str]] = {"mnms2": {"FAIL": "FALL"}}


class InputError(Exception):
    """A bad input: `path` is the offending file, `reason` says what is wrong with it (and which field)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self) -> tuple[type[InputError], tuple[str, str], dict[str, object]]:
        """Pickle as (path, reason): the default would call InputError(message) and fail in the receiving process."""
        return type(self), (self.path, self.reason), dict(self.__dict__)


@dataclass(frozen=True)
class FrameRef:
    """Where one 3D frame lives: a 3D file, or index `frame` of the 4th axis of a 4D file.

    `label_map` remaps a label file to the unified map; `frame_field` names the metadata field the index came from.
    """

    path: Path
    frame: int | None = None
    label_map: Mapping[int, int] | None = None
    frame_field: str = ""

    @property
    def description(self) -> str:
        """Human-readable location, e.g. `A0S9V9_sa.nii.gz[t=9]`."""
        return str(self.path) if self.frame is None else f"{self.path}[t={self.frame}]"


@dataclass(frozen=True)
class SubjectRecord:
    """One subject as every reader yields it; images are referenced, loaded by the worker that preprocesses them."""

    pid: str
    dataset: str
    vendor: str
    centre: str
    pathology: str
    label: int
    ed_image: FrameRef
    es_image: FrameRef
    ed_label: FrameRef | None = None
    es_label: FrameRef | None = None
    layout: str = "raw"
    source: Path = Path()
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def subject_id(self) -> str:
        """Globally unique id: dataset name + the dataset's own id (e.g. `mnms_A0S9V9`)."""
        return f"{self.dataset}_{self.pid}"

    @property
    def client(self) -> str:
        """Federated client (site) = lower-case vendor."""
        return self.vendor


@dataclass(frozen=True)
class LabelRule:
    """Binary label: NOR = 0, every other known code = 1, unless overridden (e.g. AHS or Other)."""

    overrides: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        all_codes = frozenset().union(*KNOWN_CODES.values())
        for code, value in self.overrides.items():
            if code not in all_codes:
                raise ValueError(f"label override for unknown pathology code {code!r}; known: {sorted(all_codes)}")
            if value not in (0, 1):
                raise ValueError(f"label override {code}={value}: the label must be 0 or 1")

    def code_and_label(self, dataset: str, raw_code: str, source: Path | str, field_name: str) -> tuple[str, int]:
        """Normalise a raw pathology code and return (code, label); raise InputError for an unknown code."""
        code = raw_code.strip()
        code = CODE_ALIASES.get(dataset, {}).get(code, code)
        if code not in KNOWN_CODES[dataset]:
            raise InputError(
                source,
                f"unknown pathology code {raw_code!r} in field {field_name} (known for {dataset}: "
                f"{', '.join(sorted(KNOWN_CODES[dataset]))})",
            )
        if code in self.overrides:
            return code, self.overrides[code]
        return code, 0 if code == "NOR" else 1


def parse_label_overrides(items: list[str]) -> dict[str, int]:
    """Parse CLI items like `AHS=0` into a dict."""
    overrides: dict[str, int] = {}
    for item in items:
        code, sep, value = item.partition("=")
        if not sep or value.strip() not in ("0", "1"):
            raise ValueError(f"label override {item!r} must look like CODE=0 or CODE=1")
        overrides[code.strip()] = int(value)
    return overrides


MNMS_VENDOR_LETTERS = {"A": "siemens", "B": "philips", "C": "ge", "D": "canon"}
_VENDOR_WORDS = {"siemens": "siemens", "philips": "philips", "ge": "ge", "canon": "canon", "toshiba": "canon"}


def vendor_from_name(name: str) -> str | None:
    """Client for a free-text vendor string (`SIEMENS`, `Philips Medical Systems`, `GE MEDICAL SYSTEMS`, ...)."""
    words = name.strip().lower().replace(",", " ").split()
    for word in words:
        if word in _VENDOR_WORDS:
            return _VENDOR_WORDS[word]
    return None
