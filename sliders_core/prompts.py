"""Prompt sets: what a text slider moves (c+ vs c-), on which prompts (c_t), holding what fixed (p).

The YAML format accepts the reference implementation's fields so its prompt files load unchanged:
``target`` (c_t), ``positive`` (c+), ``unconditional`` (c-, also accepted as ``negative``),
``neutral`` (the prompt whose frozen prediction the target is built on; defaults to ``target``),
``action`` (enhance | erase), ``guidance_scale`` (η; ``guidance`` is accepted as η too instead of
being silently ignored), ``resolution``, ``batch_size``, ``dynamic_resolution`` (false only).
Ours adds ``preservation``: attributes p in every step, their pushes averaged (paper eq. 8; see text_slider). A file may hold one
mapping or a list of them. Unknown keys are an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import check_eta
from .errors import SliderError

ACTIONS = ("enhance", "erase")
_KNOWN_KEYS = {
    "target", "positive", "unconditional", "negative", "neutral", "action", "guidance_scale",
    "guidance", "preservation", "resolution", "batch_size", "dynamic_resolution",
}


@dataclass(frozen=True)
class PromptPair:
    """One slider objective: ε*(x_t, c_t) ← ε(x_t, c_n) ± η mean_p [ε(x_t, c+⊕p) − ε(x_t, c-⊕p)]."""

    target: str
    positive: str
    negative: str
    neutral: str | None = None
    action: str = "enhance"
    eta: float = 1.0
    preservation: tuple[str, ...] = ()
    resolution: int | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        validate_pair(self)

    @property
    def neutral_prompt(self) -> str:
        return self.target if self.neutral is None else self.neutral

    @property
    def sign(self) -> float:
        """+1 pushes towards c+ (enhance); −1 pushes away (erase, the LECO lineage)."""
        return 1.0 if self.action == "enhance" else -1.0

    def contrast_prompts(self) -> tuple[list[str], list[str]]:
        """The c+⊕p and c-⊕p prompt lists (one each when there is no preservation attribute)."""
        attrs = self.preservation or (None,)
        return ([compose(self.positive, p) for p in attrs], [compose(self.negative, p) for p in attrs])

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "positive": self.positive, "unconditional": self.negative,
            "neutral": self.neutral_prompt, "action": self.action, "guidance_scale": self.eta,
            "preservation": list(self.preservation),
        }


def compose(prompt: str, attribute: str | None) -> str:
    """c ⊕ p: fill a ``{p}`` placeholder if the prompt has one, else append ", p"."""
    if attribute is None:
        return prompt.replace("{p}", "").replace("  ", " ").strip()
    if "{p}" in prompt:
        return prompt.replace("{p}", attribute)
    return f"{prompt}, {attribute}"


def validate_pair(pair: PromptPair) -> None:
    for name in ("target", "positive", "negative"):
        if not isinstance(getattr(pair, name), str):
            raise SliderError(f"prompt '{name}' must be text, got {getattr(pair, name)!r}")
    if not pair.positive.strip() or not pair.negative.strip():
        raise SliderError("positive and negative (unconditional) prompts must both be non-empty: "
                          "the slider learns the direction between them")
    if pair.positive.strip() == pair.negative.strip():
        raise SliderError(f"positive and negative prompts are identical ({pair.positive!r}): "
                          "there is no direction to learn; make them differ in the concept only")
    if pair.action not in ACTIONS:
        raise SliderError(f"action must be one of {ACTIONS}, got {pair.action!r}")
    check_eta(pair.eta)
    for p in pair.preservation:
        if not isinstance(p, str) or not p.strip():
            raise SliderError(f"preservation attributes must be non-empty text, got {p!r}")
    if len(set(pair.preservation)) != len(pair.preservation):
        raise SliderError(f"preservation attributes repeat: {list(pair.preservation)}")


def pair_from_dict(entry: dict[str, Any], where: str = "prompt set") -> PromptPair:
    if not isinstance(entry, dict):
        raise SliderError(f"{where}: each entry must be a mapping of prompt fields, got {type(entry).__name__}")
    unknown = sorted(set(entry) - _KNOWN_KEYS)
    if unknown:
        raise SliderError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(_KNOWN_KEYS)}")
    if "unconditional" in entry and "negative" in entry and entry["unconditional"] != entry["negative"]:
        raise SliderError(f"{where}: 'unconditional' and 'negative' both given and differ; give one")
    etas = {entry[k] for k in ("guidance_scale", "guidance") if k in entry}
    if len(etas) > 1:
        raise SliderError(f"{where}: 'guidance_scale' and 'guidance' both given and differ; give one (η)")
    if entry.get("dynamic_resolution"):
        raise SliderError(f"{where}: dynamic_resolution is not supported; set a fixed resolution")
    for key in ("target", "positive"):
        if key not in entry:
            raise SliderError(f"{where}: missing '{key}'")
    negative = entry.get("unconditional", entry.get("negative"))
    if negative is None:
        raise SliderError(f"{where}: missing 'unconditional' (the negative prompt c-)")
    preservation = entry.get("preservation") or ()
    if isinstance(preservation, str):
        preservation = [line.strip() for line in preservation.splitlines() if line.strip()]
    return PromptPair(
        target=entry["target"] if entry["target"] is not None else "",
        positive=entry["positive"],
        negative=negative,
        neutral=entry.get("neutral"),
        action=entry.get("action", "enhance"),
        eta=etas.pop() if etas else 1.0,
        preservation=tuple(preservation),
        resolution=entry.get("resolution"),
        batch_size=entry.get("batch_size"),
    )


def load_prompt_set(path: str | Path) -> list[PromptPair]:
    path = Path(path)
    if not path.is_file():
        raise SliderError(f"prompt set file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SliderError(f"{path}: not valid YAML: {exc}") from exc
    entries = data if isinstance(data, list) else [data]
    if not entries or data is None:
        raise SliderError(f"{path}: empty prompt set")
    return [pair_from_dict(e, f"{path} entry {i}") for i, e in enumerate(entries)]
