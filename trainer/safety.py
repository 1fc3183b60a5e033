"""Safety checks on what `python -m trainer.sample` is asked for and what it makes.

The Krea 2 licence makes whoever deploys the model filter both its inputs and its
outputs, so the sampler checks every prompt before it loads anything and every image
before it writes it. A checker is anything with these two methods:

    check_prompt(prompt)          -> Verdict(allowed, reason)
    check_images(images, prompts) -> [Verdict, ...]   one per image

`images` are exactly the pixels that would be written: uint8 (N, H, W, 3) RGB.

The chain is always `Blocklist` (words and phrases, whole-word, case-insensitive)
followed by one more checker. That one is `NoImageClassifier` unless
`--safety package.module:Class` names another: the place an image classifier plugs in.
There is deliberately no way to switch the prompt blocklist off.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""


@runtime_checkable
class SafetyChecker(Protocol):
    def check_prompt(self, prompt: str) -> Verdict: ...

    def check_images(self, images: np.ndarray, prompts: list[str]) -> list[Verdict]: ...


# A floor, not a policy: sexual content, minors in a sexual context, graphic violence.
# Deployments add their own terms with --blocklist FILE.
DEFAULT_BLOCKLIST = (
    "nude", "nudes", "nudity", "naked", "nsfw", "porn", "porno", "pornographic", "pornography",
    "sex", "sexual", "sexy", "explicit", "erotic", "topless", "genitals", "hentai", "fetish",
    "csam", "child abuse", "underage", "lolicon", "shotacon",
    "gore", "gory", "beheading", "dismembered", "mutilated",
)


class Blocklist:
    """Refuses a prompt that contains a blocked term as a whole word (or whole phrase).

    "Whole word" means the match may not continue into a letter, digit or underscore on
    either side, so "ass" blocks "an ass." but not "a classic"; inside a phrase any run of
    whitespace matches. Images pass: a word list cannot read pixels.
    """

    def __init__(self, terms: list[str] | tuple[str, ...] = DEFAULT_BLOCKLIST):
        self.terms = sorted({t.strip().lower() for t in terms if t.strip()})
        if not self.terms:
            raise ValueError("a blocklist needs at least one term")
        alternatives = "|".join(r"\s+".join(map(re.escape, t.split())) for t in self.terms)
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    @classmethod
    def from_files(cls, paths: list[str], base: tuple[str, ...] = DEFAULT_BLOCKLIST) -> "Blocklist":
        """The default terms plus one term per line of each file (blank lines and # comments skipped)."""
        terms = list(base)
        for path in paths:
            with open(path, encoding="utf-8") as f:
                terms += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        return cls(terms)

    def check_prompt(self, prompt: str) -> Verdict:
        m = self._pattern.search(prompt)
        if m is None:
            return Verdict(True, "")
        term = " ".join(m.group(0).lower().split())
        return Verdict(False, f'blocked term "{term}"')

    def check_images(self, images: np.ndarray, prompts: list[str]) -> list[Verdict]:
        return [Verdict(True, "")] * len(images)

    def __repr__(self) -> str:
        return f"Blocklist({len(self.terms)} terms)"


class NoImageClassifier:
    """The default output check: there is none. Every image passes, and says so.

    Replace it with `--safety package.module:Class`, a class built with no arguments
    whose `check_images` runs a real classifier (NSFW, CSAM hash matching, ...).
    """

    def check_prompt(self, prompt: str) -> Verdict:
        return Verdict(True, "")

    def check_images(self, images: np.ndarray, prompts: list[str]) -> list[Verdict]:
        return [Verdict(True, "not checked: no image classifier configured")] * len(images)

    def __repr__(self) -> str:
        return "NoImageClassifier"


class AllOf:
    """Allowed only if every checker allows; the first refusal's reason is kept."""

    def __init__(self, checkers: list[SafetyChecker]):
        self.checkers = list(checkers)

    def check_prompt(self, prompt: str) -> Verdict:
        verdicts = [c.check_prompt(prompt) for c in self.checkers]
        return _first_refusal(verdicts)

    def check_images(self, images: np.ndarray, prompts: list[str]) -> list[Verdict]:
        per_checker = []
        for checker in self.checkers:
            verdicts = list(checker.check_images(images, prompts))
            if len(verdicts) != len(images):
                raise ValueError(f"{checker!r}.check_images returned {len(verdicts)} verdicts for {len(images)} images")
            per_checker.append(verdicts)
        return [_first_refusal(list(vs)) for vs in zip(*per_checker)]

    def __repr__(self) -> str:
        return " + ".join(map(repr, self.checkers))


def _first_refusal(verdicts: list[Verdict]) -> Verdict:
    refused = [v for v in verdicts if not v.allowed]
    if refused:
        return refused[0]
    return Verdict(True, "; ".join(v.reason for v in verdicts if v.reason))


def load_checker(spec: str) -> SafetyChecker:
    """An instance of the class named "package.module:Class" (built with no arguments)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--safety {spec!r}: expected package.module:Class")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--safety {spec!r}: cannot import it ({e})") from e
    checker = cls()
    if not isinstance(checker, SafetyChecker):
        raise ValueError(f"--safety {spec!r}: {attr} needs check_prompt(prompt) and check_images(images, prompts)")
    return checker


def build_checker(blocklist_files: list[str] = (), spec: str | None = None) -> AllOf:
    """The sampler's chain: the blocklist (defaults + files), then `spec`'s checker or NoImageClassifier."""
    return AllOf([Blocklist.from_files(list(blocklist_files)), load_checker(spec) if spec else NoImageClassifier()])
