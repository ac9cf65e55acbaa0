"""Example experiment command for sdm-peer: a small species distribution model.

Run as ``python -m sdm_peer.examples.sdm_model``. It follows the sdm-peer
environment contract for experiment commands:

* ``SDM_PARAMS``         JSON object with this run's parameters (may be unset).
* ``SDM_EXPERIMENT_KEY`` the experiment's key; seeds the run when no ``seed``
                         parameter is given, so reruns of a key are identical.
* ``SDM_RESULT_FILE``    where to write the JSON result; stdout if unset.

Parameters (unknown ones are ignored):

* ``n_train``    training-set size, positive int (default 500).
* ``resolution`` grid cell size in degrees over a synthetic 0..10 x 0..10
                 landscape, e.g. 0.1 or 0.05 (default 0.1).
* ``seed``       non-negative int (default crc32 of SDM_EXPERIMENT_KEY, else 0).

The model: three smooth environmental layers (temperature, precipitation,
elevation) define a true suitability, the logistic of a quadratic in the
layers; presence/absence is drawn from it. A logistic regression on quadratic
features is fitted to a random sample of cells with Newton/IRLS (numpy only),
suitability is predicted over the whole grid, and the AUC is measured on
held-out cells. Fit, prediction and evaluation are timed separately, which
is what makes the command useful for benchmarking a grid of runs.

Exit codes: 0 on success, 2 on bad parameters (message on stderr, no result).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import zlib

import numpy as np

EXTENT = 10.0  # the landscape spans 0..EXTENT degrees on both axes
MIN_RESOLUTION = 0.01  # finer grids (> 1e6 cells) would blow the time budget
MAX_TEST_CELLS = 2000
RIDGE = 1e-3  # keeps Newton steps finite even when the sample is separable
MAX_ITERATIONS = 50
TOLERANCE = 1e-8


class ParamError(ValueError):
    """A parameter in SDM_PARAMS is missing its contract; exit code 2."""


# --- parameters -------------------------------------------------------------


def parse_params(raw: str | None, experiment_key: str | None) -> dict:
    """Validate SDM_PARAMS and fill defaults; raise ParamError on bad input."""
    try:
        params = json.loads(raw) if raw and raw.strip() else {}
    except json.JSONDecodeError as exc:
        raise ParamError(f"SDM_PARAMS is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise ParamError("SDM_PARAMS must be a JSON object")

    n_train = params.get("n_train", 500)
    # bool is an int subclass; reject it so `true` is not read as 1
    if not isinstance(n_train, int) or isinstance(n_train, bool) or n_train < 1:
        raise ParamError(f"n_train must be a positive integer, got {n_train!r}")

    resolution = params.get("resolution", 0.1)
    if (
        not isinstance(resolution, (int, float))
        or isinstance(resolution, bool)
        or not math.isfinite(resolution)
        or not MIN_RESOLUTION <= resolution <= EXTENT
    ):
        raise ParamError(
            f"resolution must be a number between {MIN_RESOLUTION} and "
            f"{EXTENT} degrees, got {resolution!r}"
        )

    default_seed = zlib.crc32(experiment_key.encode()) if experiment_key else 0
    seed = params.get("seed", default_seed)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ParamError(f"seed must be a non-negative integer, got {seed!r}")

    return {"n_train": n_train, "resolution": float(resolution), "seed": seed}


# --- synthetic landscape ----------------------------------------------------


def cell_centres(resolution: float) -> tuple[np.ndarray, np.ndarray]:
    """Flattened x, y of cell centres; the side is rounded to whole cells."""
    side = max(1, round(EXTENT / resolution))
    centres = (np.arange(side) + 0.5) * (EXTENT / side)
    x, y = np.meshgrid(centres, centres)
    return x.ravel(), y.ravel()


def _bump(x, y, cx, cy, width):
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * width**2))


def covariates(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Standardised environmental layers, one column per covariate.

    Layers are known wall-to-wall (as rasters are in real SDM work), so they
    are standardised over the whole grid rather than over the sample.
    """
    temperature = 28.0 - 1.6 * y + 0.3 * x  # cooler to the north
    precipitation = 1200 * _bump(x, y, 3, 7, 2.0) + 800 * _bump(x, y, 7.5, 2.5, 1.5)
    elevation = 900 + 600 * np.sin(x / 2.0) * np.cos(y / 3.0)
    layers = np.column_stack([temperature, precipitation, elevation])
    return (layers - layers.mean(axis=0)) / layers.std(axis=0)


def true_logit(env: np.ndarray) -> np.ndarray:
    """Quadratic niche: a temperature optimum, wet-loving, avoids extremes of height."""
    temp, precip, elev = env.T
    return 0.5 - 2.0 * (temp - 0.3) ** 2 + 1.5 * precip - 1.0 * elev**2


def sigmoid(z: np.ndarray) -> np.ndarray:
    # clip so exp never overflows; the probabilities saturate long before 35
    return 1.0 / (1.0 + np.exp(-np.clip(z, -35.0, 35.0)))


# --- model ------------------------------------------------------------------


def quadratic_features(env: np.ndarray) -> np.ndarray:
    """Intercept, linear, squared and pairwise-product terms."""
    n, k = env.shape
    pairs = [env[:, i] * env[:, j] for i in range(k) for j in range(i + 1, k)]
    return np.column_stack([np.ones(n), env, env**2, *pairs])


def fit_logistic(features: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, int]:
    """Ridge-penalised logistic regression by Newton/IRLS; returns (beta, iterations)."""
    n_coef = features.shape[1]
    beta = np.zeros(n_coef)
    penalty = RIDGE * np.eye(n_coef)
    for iteration in range(1, MAX_ITERATIONS + 1):
        p = sigmoid(features @ beta)
        gradient = features.T @ (y - p) - RIDGE * beta
        hessian = (features.T * (p * (1.0 - p))) @ features + penalty
        step = np.linalg.solve(hessian, gradient)
        beta += step
        if np.max(np.abs(step)) < TOLERANCE:
            break
    return beta, iteration


# --- evaluation -------------------------------------------------------------


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auc(y_true, scores) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic.

    Ties count as half a correct ordering. Returns nan when only one class
    is present, since the AUC is undefined then.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError("y_true and scores must have the same length")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = _average_ranks(s)[y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# --- run --------------------------------------------------------------------


def run(n_train: int, resolution: float, seed: int) -> dict:
    """Build the landscape, fit, predict, evaluate; return the result record."""
    rng = np.random.default_rng(seed)
    env = covariates(*cell_centres(resolution))
    cells = env.shape[0]
    if n_train >= cells:
        raise ParamError(
            f"n_train={n_train} leaves no test cells: the grid at resolution "
            f"{resolution} has only {cells} cells"
        )
    presence = (rng.random(cells) < sigmoid(true_logit(env))).astype(float)

    shuffled = rng.permutation(cells)
    train = shuffled[:n_train]
    test = shuffled[n_train : n_train + MAX_TEST_CELLS]

    started = time.perf_counter()
    beta, iterations = fit_logistic(quadratic_features(env[train]), presence[train])
    fitted = time.perf_counter()
    suitability = sigmoid(quadratic_features(env) @ beta)
    predicted = time.perf_counter()
    test_auc = auc(presence[test], suitability[test])
    evaluated = time.perf_counter()

    return {
        # JSON has no NaN; null marks an undefined AUC (single-class test set)
        "auc": None if math.isnan(test_auc) else test_auc,
        "fit_seconds": fitted - started,
        "predict_seconds": predicted - fitted,
        "evaluate_seconds": evaluated - predicted,
        "n_train": n_train,
        "resolution": resolution,
        "cells": cells,
        "iterations": iterations,
        "prevalence": float(presence.mean()),
    }


def write_result(result: dict, path: str | None) -> None:
    """Write the result JSON; atomically, so a preempted run leaves no half file."""
    text = json.dumps(result, sort_keys=True)
    if not path:
        print(text)
        return
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    os.replace(partial, path)


def summary(result: dict) -> str:
    auc_text = "undefined" if result["auc"] is None else f"{result['auc']:.3f}"
    return (
        f"sdm_model: AUC {auc_text} (n_train={result['n_train']}, "
        f"{result['cells']} cells at {result['resolution']} deg, "
        f"{result['iterations']} IRLS iterations); "
        f"fit {result['fit_seconds'] * 1e3:.1f} ms, "
        f"predict {result['predict_seconds'] * 1e3:.1f} ms, "
        f"evaluate {result['evaluate_seconds'] * 1e3:.1f} ms"
    )


def main() -> int:
    try:
        params = parse_params(
            os.environ.get("SDM_PARAMS"), os.environ.get("SDM_EXPERIMENT_KEY")
        )
        result = run(**params)
    except ParamError as exc:
        print(f"sdm_model: bad parameters: {exc}", file=sys.stderr)
        return 2
    write_result(result, os.environ.get("SDM_RESULT_FILE"))
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
