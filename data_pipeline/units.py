"""Quantities in answers: a number, how it is scaled, and its unit.

``$1,234.56``, ``twelve``, ``5\\,\\text{cm}^2``, ``30°``, ``5.2 million``, ``50%`` and ``3 hours``
are read as a :class:`Quantity`; anything else (``5 or 6``, ``3/4``, ``12 apples``) is not one.
Spellings of a unit are reduced to one name (``\\mathrm{km}``, ``km``, ``kilometres`` -> ``km``;
``cm^2``, ``cm²``, ``square centimeters`` -> ``cm^2``; ``°``, ``^\\circ``, ``degrees`` -> ``°``), so
two answers can be checked to state the *same* unit. Units are not converted: ``1 km`` is not
``1000 m`` (a ground truth's unit is the one its question asks for).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from data_pipeline.answer_text import clean_answer

# Canonical unit name -> its spellings (lower case). A plural "s" is accepted on words of three
# letters or more ("metres", "hours"), so only irregular plurals are listed.
_UNIT_SPELLINGS: dict[str, tuple[str, ...]] = {
    "mm": ("mm", "millimeter", "millimetre"),
    "cm": ("cm", "centimeter", "centimetre"),
    "m": ("m", "meter", "metre"),
    "km": ("km", "kilometer", "kilometre"),
    "µm": ("µm", "μm", "um", "micrometer", "micrometre", "micron"),
    "nm": ("nm", "nanometer", "nanometre"),
    "in": ("in", "inch", "inches", "″"),
    "ft": ("ft", "foot", "feet", "′"),
    "yd": ("yd", "yard"),
    "mi": ("mi", "mile"),
    "ha": ("ha", "hectare"),
    "acre": ("acre",),
    "ml": ("ml", "milliliter", "millilitre"),
    "l": ("l", "liter", "litre"),
    "gal": ("gal", "gallon"),
    "mg": ("mg", "milligram", "milligramme"),
    "g": ("g", "gram", "gramme"),
    "kg": ("kg", "kilogram", "kilogramme", "kilo"),
    "t": ("tonne", "ton"),
    "lb": ("lb", "lbs"),
    "oz": ("oz", "ounce"),
    "ms": ("ms", "millisecond"),
    "s": ("s", "sec", "secs", "second"),
    "min": ("min", "mins", "minute"),
    "h": ("h", "hr", "hrs", "hour"),
    "day": ("day", "days"),
    "week": ("week", "wk"),
    "month": ("month",),
    "year": ("year", "yr", "yrs"),
    "°": ("°", "deg", "degree"),
    "rad": ("rad", "radian"),
    "°c": ("°c", "℃", "celsius"),
    "°f": ("°f", "℉", "fahrenheit"),
    "%": ("%", "percent", "pct"),
    "$": ("$", "usd", "us$", "dollar"),
    "€": ("€", "eur", "euro"),
    "£": ("£", "gbp"),
    "¥": ("¥", "cny", "rmb", "yuan", "元"),
    "jpy": ("jpy", "yen"),
    "₹": ("₹", "inr", "rupee"),
    "cent": ("cent", "¢"),
    "km/h": ("kph", "kmh"),
    "mi/h": ("mph",),
    "kb": ("kb", "kilobyte"),
    "mb": ("mb", "megabyte"),
    "gb": ("gb", "gigabyte"),
    "tb": ("tb", "terabyte"),
    "hz": ("hz", "hertz"),
    "khz": ("khz",),
    "mhz": ("mhz",),
    "ghz": ("ghz",),
    "v": ("v", "volt"),
    "w": ("w", "watt"),
    "kw": ("kw", "kilowatt"),
    "kwh": ("kwh",),
    "j": ("j", "joule"),
    "cal": ("cal", "calorie"),
    "kcal": ("kcal",),
    "pa": ("pa", "pascal"),
    "kpa": ("kpa",),
    "unit": ("unit",),
}
UNITS: dict[str, str] = {}
for _name, _spellings in _UNIT_SPELLINGS.items():
    for _spelling in _spellings:
        UNITS[_spelling] = _name
        if len(_spelling) >= 3 and _spelling.isalpha() and not _spelling.endswith("s"):
            UNITS[_spelling + "s"] = _name

# Scale words multiply the number: "5.2 million", "$3bn", "12k". Case matters for the short
# ones: "M" is a million, "m" a metre.
SCALES = {"thousand": 1e3, "k": 1e3, "K": 1e3, "million": 1e6, "mn": 1e6, "M": 1e6, "billion": 1e9,
          "bn": 1e9, "trillion": 1e12}
CURRENCY_SIGNS = {"\\$": "$", "US$": "$", "$": "$", "€": "€", "£": "£", "¥": "¥", "₹": "₹"}
# Units that convert within a dimension, as (dimension, size in the dimension's SI unit). Months
# and years (of varying length), temperatures (offsets), currencies other than cents (exchange
# rates) and bytes (1000 or 1024) convert to nothing: only the same name agrees.
_SIZES: dict[str, tuple[str, float]] = {
    "mm": ("length", 1e-3), "cm": ("length", 1e-2), "m": ("length", 1.0), "km": ("length", 1e3),
    "µm": ("length", 1e-6), "nm": ("length", 1e-9), "in": ("length", 0.0254), "ft": ("length", 0.3048),
    "yd": ("length", 0.9144), "mi": ("length", 1609.344),
    "mg": ("mass", 1e-6), "g": ("mass", 1e-3), "kg": ("mass", 1.0), "t": ("mass", 1e3),
    "lb": ("mass", 0.45359237), "oz": ("mass", 0.028349523125),
    "ms": ("time", 1e-3), "s": ("time", 1.0), "min": ("time", 60.0), "h": ("time", 3600.0),
    "day": ("time", 86400.0), "week": ("time", 604800.0),
    "ml": ("length", 1e-2), "l": ("length", 1e-1),  # cube roots: 1 ml = 1 cm^3, 1 l = 1 dm^3
    "ha": ("length", 100.0), "acre": ("length", 4046.8564224**0.5),  # square roots: 1 ha = (100 m)^2
    "°": ("angle", 3.141592653589793 / 180), "rad": ("angle", 1.0),
    "$": ("dollar", 1.0), "cent": ("dollar", 0.01),
    "hz": ("frequency", 1.0), "khz": ("frequency", 1e3), "mhz": ("frequency", 1e6), "ghz": ("frequency", 1e9),
    "w": ("power", 1.0), "kw": ("power", 1e3), "j": ("energy", 1.0), "kwh": ("energy", 3.6e6),
    "cal": ("energy", 4.184), "kcal": ("energy", 4184.0), "pa": ("pressure", 1.0), "kpa": ("pressure", 1e3),
}
# A volume or area unit stands for a power of its length: "ml" is (cm)^3, "ha" is (hm)^2.
_POWERS = {"ml": 3, "l": 3, "ha": 2, "acre": 2}

_SMALL = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
NUMBER_WORDS = {word: value for value, word in enumerate(_SMALL)} | {word: 20 + 10 * i for i, word in enumerate(_TENS)}
_DIGIT_WORD = "one|two|three|four|five|six|seven|eight|nine"
# 0-999 in words: "twelve", "twenty-one", "one hundred and five". Larger amounts take a scale word.
_WORD_NUMBER = re.compile(
    rf"(?:(?P<hundreds>{_DIGIT_WORD})[\s-]+hundred(?:[\s-]+and)?[\s-]*)?"
    rf"(?:(?P<tens>{'|'.join(_TENS)})(?:[\s-]+(?P<ones>{_DIGIT_WORD}))?|(?P<small>{'|'.join(reversed(_SMALL))}))?\b",
    re.IGNORECASE,
)
_DIGITS = re.compile(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[-+]?\d+)?|\.\d+(?:e[-+]?\d+)?", re.IGNORECASE)
_HEAD = re.compile(r"(?P<sign>[-+−])?\s*(?P<currency>\\\$|US\$|\$|€|£|¥|₹)?\s*(?P<sign2>[-+−])?\s*")
# "x = 5", "AB = 5 cm", "\theta = 30^\circ", "\angle ABC = 30^\circ": the value of a named quantity.
_ASSIGNMENT = re.compile(r"^(?=[A-Za-z\\])(?:\\[A-Za-z]+\s*)?[A-Za-z]*(?:_\{?\w+\}?)?\s*=\s*(?=\S)")
# A group separator written as LaTeX or Unicode spacing: "1\,000", "1{,}000", "1 000".
_GROUP_SEPARATOR = re.compile(r"(?<=\d)(?:\{,\}|\\,|\\ |[\u2009\u202f\u00a0])(?=\d{3}(?!\d))")


@dataclass(frozen=True)
class UnitReading:
    """What follows a number: a scale factor (1 when none) and a unit name (None when none)."""

    scale: float = 1.0
    unit: str | None = None


@dataclass(frozen=True)
class Quantity:
    """A number as written, its scale (``million`` -> 1e6, else 1) and its unit name, or None."""

    value: float
    scale: float = 1.0
    unit: str | None = None


def _normalise_unit_text(text: str) -> str:
    text = re.sub(r"\\(?:text|mathrm|textrm|mbox|operatorname)\s*\{", "{", text)
    text = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree", "°", text)
    text = text.replace("\\%", "%").replace("\\$", "$").replace("²", "^2").replace("³", "^3")
    text = re.sub(r"\\[,;:! ]|~", " ", text).replace("{", "").replace("}", "")
    text = re.sub(r"\s*([/^])\s*", r"\1", text)
    return " ".join(text.split())


def _base_unit(part: str) -> str | None:
    match = re.fullmatch(r"([^\s^]+)(?:\^(\d))?", part)
    if not match or match.group(1) not in UNITS:
        return None
    name, power = UNITS[match.group(1)], match.group(2)
    return name if power in (None, "1") else f"{name}^{power}"


def read_unit(text: str) -> UnitReading | None:
    """The scale and unit in ``text`` (what follows a number), or None when it is not one.

    ``""`` -> no scale, no unit; ``\\text{cm}^2`` / ``cm²`` / ``square centimetres`` -> ``cm^2``;
    ``km/h`` / ``kilometers per hour`` -> ``km/h``; ``million dollars`` -> 1e6, ``$``;
    ``apples`` -> None.
    """
    text = _normalise_unit_text(text)
    scale = 1.0
    head, _, tail = text.partition(" ")
    if head in SCALES or head.lower() in ("thousand", "million", "billion", "trillion"):
        scale, text = SCALES[head if head in SCALES else head.lower()], tail
    if not text:
        return UnitReading(scale, None)
    text = text.lower()
    text = re.sub(r"\bper\s*cent\b", "%", text)
    text = re.sub(r"\bdegrees?\s*(celsius|centigrade)\b|°\s*c\b", "°c", text)
    text = re.sub(r"\bdegrees?\s*fahrenheit\b|°\s*f\b", "°f", text)
    text = re.sub(r"\b(?:square|sq\.?)\s+([^\s/]+)", r"\1^2", text)
    text = re.sub(r"\bcubic\s+([^\s/]+)", r"\1^3", text)
    text = re.sub(r"(\S+)\s+squared\b", r"\1^2", text)
    text = re.sub(r"(\S+)\s+cubed\b", r"\1^3", text)
    text = re.sub(r"\s*\bper\s+", "/", text)
    parts = [_base_unit(part) for part in text.split("/")]
    if not parts or None in parts:
        return None
    return UnitReading(scale, "/".join(parts))


def _read_number(text: str) -> tuple[float, int] | None:
    digits = _DIGITS.match(text)
    if digits:
        return float(digits.group().replace(",", "")), digits.end()
    words = _WORD_NUMBER.match(text)
    if not words or not words.group().strip():
        return None
    value = NUMBER_WORDS.get((words.group("small") or "").lower(), 0)
    value += NUMBER_WORDS.get((words.group("tens") or "").lower(), 0) + NUMBER_WORDS.get((words.group("ones") or "").lower(), 0)
    value += 100 * NUMBER_WORDS.get((words.group("hundreds") or "").lower(), 0)
    return float(value), words.end()


def parse_quantity(text: str) -> Quantity | None:
    """The quantity a whole answer states, or None.

    Accepts a sign, a currency sign (``$``, ``\\$``, ``€``, ``£``, ``¥``; before or after the
    sign), thousands separators (``1,234``, ``1\\,234``, ``1{,}234``), a decimal part and an
    exponent, or a number in words up to 999 (``twelve``, ``twenty-one``), then an optional
    scale word and unit (:func:`read_unit`). A leading ``x =`` naming the quantity is skipped.
    ``1,2345`` (a misplaced separator), ``5-6``, ``3/4`` and ``12 apples`` are not quantities.
    """
    text = _ASSIGNMENT.sub("", clean_answer(text), count=1)
    text = _GROUP_SEPARATOR.sub(",", text)
    head = _HEAD.match(text)
    if head.group("sign") and head.group("sign2"):
        return None
    number = _read_number(text[head.end() :])
    if number is None:
        return None
    value, length = number
    if (head.group("sign") or head.group("sign2")) in ("-", "−"):
        value = -value
    unit = read_unit(text[head.end() + length :])
    if unit is None:
        return None
    currency = CURRENCY_SIGNS.get(head.group("currency") or "")
    if currency is not None:
        if unit.unit not in (None, currency):
            return None  # "$5 €" names two currencies
        unit = UnitReading(unit.scale, currency)
    return Quantity(value, unit.scale, unit.unit)


def _readings(quantity: Quantity, other: Quantity, chart: bool) -> set[float]:
    """The values ``quantity`` may stand for when compared with ``other``.

    Its scaled value (``5.2 million`` = ``5200000``); on a chart, where ``other`` has no scale,
    also the number as written (``5.2 million`` = ``5.2`` on an axis in millions). A percentage
    against a plain number is also read as a fraction (``50%`` = ``0.5``, and = ``50`` as in the
    official rules).
    """
    values = {quantity.value * quantity.scale}
    if chart and quantity.scale != 1.0 and other.scale == 1.0:
        values.add(quantity.value)
    if quantity.unit == "%" and other.unit is None:
        values |= {value / 100 for value in values}
    return values


def _dimension(unit: str) -> tuple[tuple[tuple[str, int], ...], float] | None:
    """``(dimension powers, size)`` of a unit name: ``km/h`` -> ``((("length", 1), ("time", -1)), 1000/3600)``."""
    powers: dict[str, int] = {}
    size = 1.0
    for index, part in enumerate(unit.split("/")):
        name, _, power = part.partition("^")
        if name not in _SIZES:
            return None
        dimension, part_size = _SIZES[name]
        exponent = (int(power) if power else 1) * _POWERS.get(name, 1) * (1 if index == 0 else -1)
        powers[dimension] = powers.get(dimension, 0) + exponent
        size *= part_size**exponent
    return tuple(sorted((d, p) for d, p in powers.items() if p)), size


def unit_ratio(first: str | None, second: str | None) -> float | None:
    """How many ``second`` one ``first`` is (``km``, ``m`` -> 1000), or None when the units disagree.

    A unit on one side only agrees (``12 cm`` = ``12``): ratio 1. Two units agree when they are
    the same or convert into each other (``km`` and ``m``, ``ml`` and ``cm^3``, ``kph`` and
    ``m/s``); ``km`` and ``kg``, or ``cm^2`` and ``cm``, do not.
    """
    if first is None or second is None or first == second:
        return 1.0
    first_dimension, second_dimension = _dimension(first), _dimension(second)
    if first_dimension is None or second_dimension is None or first_dimension[0] != second_dimension[0]:
        return None
    return first_dimension[1] / second_dimension[1]


def units_agree(first: str | None, second: str | None) -> bool:
    """A unit on both sides must be the same unit or convert; a unit on one side only is allowed."""
    return unit_ratio(first, second) is not None


def quantities_match(prediction: Quantity, truth: Quantity, close: Callable[[float, float], bool], chart: bool = False) -> bool:
    """Units agree and some reading of the prediction, in the truth's unit, is ``close`` to some reading of the truth.

    Args:
        prediction: The answer's quantity.
        truth: The ground truth's.
        close: The number rule, ``close(prediction value, truth value)``.
        chart: Whether a scale word on one side only may be a chart axis's (see :func:`_readings`).
    """
    ratio = unit_ratio(prediction.unit, truth.unit)
    if ratio is None:
        return False
    predictions = _readings(prediction, truth, chart)
    if ratio != 1.0:
        # 12 significant digits: 3 days is 72 hours exactly, not 72.00000000000001.
        predictions = {float(f"{value * ratio:.12g}") for value in predictions}
    truths = _readings(truth, prediction, chart)
    return any(close(p, t) for p in predictions for t in truths)


def split_unit(expression: str) -> tuple[str, UnitReading]:
    """``(expression without its trailing unit, the unit)`` for a LaTeX answer.

    ``2\\pi \\text{ cm}`` -> ``("2\\pi", cm)``; ``90^\\circ`` -> ``("90", °)``; ``x^2 + 1`` -> no
    unit. A letter glued to what precedes it (``3m``, ``2\\pi r``) is a variable, not a unit; a
    unit needs a space, a ``\\text{}``-like wrapper or a sign of its own (``°``, ``%``).
    """
    for match in re.finditer(r"(?<=[\s\d})\]])(?=\S)|(?=\\(?:text|mathrm|textrm|mbox)\{|\^\s*\{?\s*\\circ|\\%|%|°)", expression):
        start = match.start()
        tail = expression[start:]
        if start and expression[start - 1] not in " \t}" and re.match(r"[A-Za-z]", tail):
            continue  # glued letters: a variable ("3m" in algebra) or a command's name
        braces = re.sub(r"\\[{}]", "", expression[:start])
        if braces.count("{") != braces.count("}"):
            continue  # inside a group: "\frac{5}{2}" does not end after its "2"
        reading = read_unit(tail)
        if reading is not None and (reading.unit is not None or reading.scale != 1.0):
            core = expression[:start].rstrip()
            core = re.sub(r"(?:\\[,;:! ]|~|\s)+$", "", core)
            return core, reading
    return expression, UnitReading()
