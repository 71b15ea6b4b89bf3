"""Prompt preprocessing before a call: clean, scrub, truncate, template — and say what was done.

Steps run in a fixed order on the user's text: control characters removed, whitespace
normalised, personal data scrubbed, truncated to a limit (with a marker), then placed into
the template. The result keeps the original and the sent text and lists every step that
changed something, so the record shows exactly what the model saw and why.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, field_validator

PLACEHOLDER = "{user_input}"


class PreprocessConfig(BaseModel):
    """Which preprocessing steps run. Unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strip_control_chars: bool = Field(True, description="Remove non-printing control characters.")
    normalise_whitespace: bool = Field(True, description="Collapse runs of spaces and blank lines.")
    scrub_pii: bool = Field(False, description="Replace emails, phones, IBANs and card numbers.")
    max_chars: int | None = Field(None, gt=0, description="Truncate the user text to this length.")
    truncation_marker: str = Field(" …[truncated]", description="Appended when truncating.")
    template: str | None = Field(None, description="Wraps the text; must contain {user_input}.")

    @field_validator("template")
    @classmethod
    def _template_has_placeholder(cls, value: str | None) -> str | None:
        if value is not None and PLACEHOLDER not in value:
            raise ValueError(f"the template must contain {PLACEHOLDER}")
        return value


@dataclass
class PreprocessResult:
    """The original text, the text to send, and what changed it."""

    original: str
    sent: str
    steps: list[str] = field(default_factory=list)
    redactions: dict[str, int] = field(default_factory=dict)
    truncated: bool = False

    @property
    def changed(self) -> bool:
        return self.original != self.sent

    def to_json(self) -> dict[str, object]:
        return {
            "steps": list(self.steps),
            "redactions": dict(self.redactions),
            "truncated": self.truncated,
            "original_chars": len(self.original),
            "sent_chars": len(self.sent),
        }


# --- control characters and whitespace --------------------------------------------------

_KEEP_CONTROLS = {"\n", "\t"}


# The control characters of ASCII text (its only Cc/Cf characters): one regex pass.
_ASCII_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def strip_control_chars(text: str) -> str:
    """Drop C0/C1 control and format characters (zero-width, bidi overrides), keep \\n and \\t."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():
        return _ASCII_CONTROLS.sub("", text)
    return "".join(
        ch for ch in text if ch in _KEEP_CONTROLS or unicodedata.category(ch) not in ("Cc", "Cf")
    )


_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalise_whitespace(text: str) -> str:
    """Collapse horizontal whitespace runs to one space, trim lines, keep at most one blank line."""
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


# --- personal data ----------------------------------------------------------------------

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b")
_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?!\w)"
)


def _iban_valid(candidate: str) -> bool:
    compact = candidate.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    digits = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(digits) % 97 == 1


def _luhn_valid(candidate: str) -> bool:
    digits = [int(ch) for ch in candidate if ch.isdigit()]
    if not 13 <= len(digits) <= 19 or digits[0] not in (2, 3, 4, 5, 6):
        return False  # card numbers start with 2-6 (Mastercard, Amex, Visa, Discover...)
    total = 0
    for index, digit in enumerate(reversed(digits)):
        if index % 2 == 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def scrub_pii(text: str) -> tuple[str, dict[str, int]]:
    """Replace emails, IBANs, payment-card numbers and phone numbers with typed placeholders."""
    counts: dict[str, int] = {}

    def replace(pattern: re.Pattern[str], label: str, check=None):
        def _sub(match: re.Match[str]) -> str:
            if check is not None and not check(match.group(0)):
                return match.group(0)
            counts[label] = counts.get(label, 0) + 1
            return f"[{label}]"

        return lambda value: pattern.sub(_sub, value)

    for step in (
        replace(_EMAIL, "EMAIL"),
        replace(_IBAN, "IBAN", _iban_valid),
        replace(_CARD, "CARD", _luhn_valid),
        replace(_PHONE, "PHONE", lambda s: sum(ch.isdigit() for ch in s) >= 7),
    ):
        text = step(text)
    return text, counts


# --- the pipeline -----------------------------------------------------------------------


def apply_template(template: str, user_input: str) -> str:
    """Put the text into the template. Braces in either are literal: no str.format involved."""
    return template.replace(PLACEHOLDER, user_input)


def preprocess(text: str, config: PreprocessConfig | None = None) -> PreprocessResult:
    """Run the configured steps on one user text."""
    config = config or PreprocessConfig()
    result = PreprocessResult(original=text, sent=text)
    current = text
    if config.strip_control_chars:
        cleaned = strip_control_chars(current)
        if cleaned != current:
            result.steps.append("strip_control_chars")
        current = cleaned
    if config.normalise_whitespace:
        cleaned = normalise_whitespace(current)
        if cleaned != current:
            result.steps.append("normalise_whitespace")
        current = cleaned
    if config.scrub_pii:
        cleaned, counts = scrub_pii(current)
        if counts:
            result.steps.append("scrub_pii")
            result.redactions = counts
        current = cleaned
    if config.max_chars is not None and len(current) > config.max_chars:
        keep = max(0, config.max_chars - len(config.truncation_marker))
        current = current[:keep].rstrip() + config.truncation_marker
        result.truncated = True
        result.steps.append("truncate")
    if config.template is not None:
        current = apply_template(config.template, current)
        result.steps.append("template")
    result.sent = current
    return result
