"""Tests for the example experiment command sdm_peer.examples.sdm_model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdm_peer.examples.sdm_model import auc

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_KEYS = {
    "auc",
    "fit_seconds",
    "predict_seconds",
    "evaluate_seconds",
    "n_train",
    "resolution",
    "cells",
    "iterations",
    "prevalence",
}


# --- auc helper --------------------------------------------------------------


def test_auc_perfect_ranking_is_one():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0


def test_auc_reversed_ranking_is_zero():
    assert auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0


def test_auc_all_scores_tied_is_half():
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_auc_partial_ties_count_half():
    # pairs (pos, neg): (0.8,0.2)=1, (0.8,0.8)=0.5, (0.4,0.2)=1, (0.4,0.8)=0
    assert auc([1, 0, 1, 0], [0.8, 0.2, 0.4, 0.8]) == pytest.approx(2.5 / 4)


def test_auc_matches_pairwise_count():
    rng = np.random.default_rng(7)
    y = rng.random(200) < 0.3
    scores = rng.integers(0, 10, size=200).astype(float)  # many ties
    pos, neg = scores[y], scores[~y]
    diff = pos[:, None] - neg[None, :]
    expected = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert auc(y, scores) == pytest.approx(expected)


def test_auc_single_class_is_nan():
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))


# --- the command as a subprocess ----------------------------------------------


def run_model(tmp_path, params):
    result_file = tmp_path / "result.json"
    env = dict(os.environ)
    env.pop("SDM_EXPERIMENT_KEY", None)
    env["SDM_PARAMS"] = params if isinstance(params, str) else json.dumps(params)
    env["SDM_RESULT_FILE"] = str(result_file)
    completed = subprocess.run(
        [sys.executable, "-m", "sdm_peer.examples.sdm_model"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return completed, result_file


def test_run_writes_result(tmp_path):
    completed, result_file = run_model(tmp_path, {"n_train": 1000, "resolution": 0.1})
    assert completed.returncode == 0, completed.stderr
    assert "AUC" in completed.stdout

    result = json.loads(result_file.read_text())
    assert isinstance(result, dict)
    assert RESULT_KEYS <= result.keys()
    assert 0.6 <= result["auc"] <= 1.0
    for key in ("fit_seconds", "predict_seconds", "evaluate_seconds"):
        assert result[key] >= 0
    assert result["n_train"] == 1000
    assert result["resolution"] == 0.1
    assert result["cells"] == 100 * 100
    assert result["iterations"] >= 1
    assert 0.0 < result["prevalence"] < 1.0


def test_same_seed_gives_same_auc(tmp_path):
    params = {"n_train": 300, "resolution": 0.2, "seed": 42, "unknown": "ignored"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, first_file = run_model(tmp_path / "a", params)
    second, second_file = run_model(tmp_path / "b", params)
    assert first.returncode == second.returncode == 0
    first_result = json.loads(first_file.read_text())
    second_result = json.loads(second_file.read_text())
    assert first_result["auc"] == second_result["auc"]
    assert first_result["cells"] == 50 * 50


@pytest.mark.parametrize(
    "params",
    [
        {"n_train": 0},
        {"n_train": -5},
        {"n_train": "100"},
        {"n_train": 2.5},
        {"n_train": True},
        {"resolution": 0},
        {"resolution": "fine"},
        {"seed": -1},
        {"n_train": 10_000, "resolution": 0.1},  # no cells left to test on
        "[1, 2]",
        "{not json",
    ],
)
def test_bad_params_exit_2_and_write_nothing(tmp_path, params):
    completed, result_file = run_model(tmp_path, params)
    assert completed.returncode == 2
    assert "bad parameters" in completed.stderr
    assert not result_file.exists()
    assert list(tmp_path.iterdir()) == []
