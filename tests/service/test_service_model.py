"""The JSON model: round trip, agreement with scikit-learn, atomic install and rollback."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from deepfake import features, model as model_module, training
from deepfake.model import BASELINE_PATH, LinearModel, ModelError, ModelFiles, read_model


def small_set(seed: int = 0) -> training.TrainingSet:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(12):
        label = i % 2
        vectors = rng.normal(loc=label * 0.8, size=(5, features.N_FEATURES))
        images.append((vectors, label, "g%d" % (i // 2), "feedback", "k%d" % label))
    return training.TrainingSet.from_images(images)


def test_json_round_trip_predicts_identically(tmp_path) -> None:
    data = small_set()
    model = training.train_model(data, "t-1", {"accuracy": 1.0}, {"feedback_samples": 12})
    path = str(tmp_path / "m.json")
    with open(path, "w") as handle:
        json.dump(model.to_json(), handle)
    loaded = read_model(path)
    assert loaded.version == "t-1" and loaded.metrics == {"accuracy": 1.0}
    assert np.allclose(loaded.crop_logits(data.vectors), model.crop_logits(data.vectors),
                       rtol=0, atol=1e-12)


def test_numpy_prediction_matches_scikit_learn() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    data = small_set(1)
    model = training.train_model(data, "t", {}, {})
    scaler = StandardScaler().fit(data.vectors)
    clf = LogisticRegression(C=training.C, max_iter=training.MAX_ITER, class_weight="balanced")
    clf.fit(scaler.transform(data.vectors), data.crop_label)
    expected = clf.decision_function(scaler.transform(data.vectors))
    assert np.allclose(model.crop_logits(data.vectors), expected, atol=1e-6)
    probability = model.probability(data.vectors[:5])
    assert probability == pytest.approx(1 / (1 + np.exp(-expected[:5].mean())))
    assert model.probability(np.empty((0, features.N_FEATURES))) is None


def test_install_keeps_the_previous_model_and_falls_back_when_current_is_damaged(tmp_path):
    files = ModelFiles(str(tmp_path))
    baseline, source = files.load_active()
    assert source == "baseline" and baseline.version == "baseline-1"
    first = training.train_model(small_set(2), "first", {}, {})
    second = training.train_model(small_set(3), "second", {}, {})
    files.install(first)
    files.install(second)
    assert read_model(files.previous).version == "first"
    assert files.load_active()[0].version == "second"
    with open(files.current, "w") as handle:
        handle.write('{"format": "deepfake-linear-mo')  # a torn write from some other tool
    model, source = files.load_active()
    assert (model.version, source) == ("first", "previous")
    assert not [n for n in os.listdir(files.directory) if n.startswith(".tmp-")]


def test_models_for_other_features_or_malformed_are_refused(tmp_path) -> None:
    data = json.load(open(BASELINE_PATH))
    with pytest.raises(ModelError):
        LinearModel.from_json(dict(data, feature_version="other-v0"))
    with pytest.raises(ModelError):
        LinearModel.from_json(dict(data, coef=[1.0, 2.0]))
    with pytest.raises(ModelError):
        LinearModel.from_json(dict(data, scaler={"mean": data["scaler"]["mean"],
                                                 "scale": [0.0] * features.N_FEATURES}))
    missing = ModelFiles(str(tmp_path), baseline_path=str(tmp_path / "nope.json"))
    assert missing.load_active()[0] is None


def test_the_shipped_model_is_plain_json_with_its_metrics() -> None:
    with open(BASELINE_PATH, "rb") as handle:
        data = json.loads(handle.read().decode("utf-8"))
    assert data["feature_version"] == features.FEATURE_VERSION
    metrics = data["metrics"]
    assert 0.5 < metrics["accuracy"] <= 1.0 and "grouped" in metrics["validation"]


def test_install_waits_out_a_reader_holding_the_file_on_windows(tmp_path, monkeypatch) -> None:
    # Windows answers a rename over a file another worker has open with PermissionError
    files = ModelFiles(str(tmp_path))
    files.install(training.train_model(small_set(4), "first", {}, {}))
    real_replace = os.replace
    refusals = []

    def busy_once_each(source, target):
        if target not in refusals:
            refusals.append(target)
            raise PermissionError(13, "The process cannot access the file", target)
        real_replace(source, target)
    monkeypatch.setattr(model_module.os, "replace", busy_once_each)
    monkeypatch.setattr(model_module, "REPLACE_RETRY_SECONDS", 2.0)
    files.install(training.train_model(small_set(5), "second", {}, {}))
    assert refusals == [files.previous, files.current]
    assert files.load_active()[0].version == "second"
    assert read_model(files.previous).version == "first"
    monkeypatch.setattr(model_module, "REPLACE_RETRY_SECONDS", 0.0)  # POSIX: no retry
    refusals.clear()
    with pytest.raises(PermissionError):
        files.install(training.train_model(small_set(6), "third", {}, {}))


def test_replace_only_if_no_worse_on_both_kinds_of_held_out_images() -> None:
    """retrain._compare, the rule itself: each outcome, not either."""
    from deepfake.retrain import BASELINE_TOLERANCE, _compare

    old = {"feedback_balanced_accuracy": 0.80, "baseline_accuracy": 0.90}
    same = dict(old)
    assert _compare(same, old)[0] is True
    assert _compare({**old, "feedback_balanced_accuracy": 0.79}, old)[0] is False
    worse_base = {**old, "baseline_accuracy": 0.90 - BASELINE_TOLERANCE - 0.001}
    replaced, reason = _compare(worse_base, old)
    assert replaced is False and "held-out baseline images" in reason
    within = {**old, "baseline_accuracy": 0.90 - BASELINE_TOLERANCE + 0.001}
    assert _compare(within, old)[0] is True
    better = {"feedback_balanced_accuracy": 0.95, "baseline_accuracy": 0.91}
    replaced, reason = _compare(better, old)
    assert replaced is True and reason.startswith("replaced")
    assert _compare({"feedback_balanced_accuracy": None, "baseline_accuracy": 0.9}, old)[0]
