"""Stage-2 metrics against scikit-learn on the same predictions, and the files they are written to."""

import csv

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from stage2_temporal.training.metrics import classification_metrics, format_table, write_confusion


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    num_classes, n = 7, 60
    labels = rng.integers(0, num_classes - 1, n)  # class 6 never occurs: it must not count in the mean
    scores = rng.random((n, num_classes))
    scores[::5] = np.round(scores[::5], 1)  # some ties, ranked as scikit-learn ranks them
    m = classification_metrics(scores, labels, num_classes)
    predictions = np.argsort(scores, axis=1, kind="mergesort")[:, ::-1][:, 0]
    everything = list(range(num_classes))
    assert m["mean_class_acc"] == pytest.approx(balanced_accuracy_score(labels, predictions))
    for k, key in ((1, "top1"), (5, "top5")):
        assert m[key] == pytest.approx(top_k_accuracy_score(labels, scores, k=k, labels=everything))
    assert np.array_equal(m["confusion"], sk_confusion_matrix(labels, predictions, labels=everything))
    assert m["per_class_acc"][6] is None
    matrix = sk_confusion_matrix(labels, predictions, labels=everything)[:6, :6]
    assert np.allclose(m["per_class_acc"][:6], matrix.diagonal() / np.bincount(labels, minlength=6))


def test_mean_class_accuracy_differs_from_top1_on_imbalanced_labels():
    labels = np.array([0] * 8 + [1] * 2)
    scores = np.zeros((10, 2))
    scores[:, 0] = 1.0  # always predicts the majority class
    m = classification_metrics(scores, labels, 2)
    assert m["top1"] == pytest.approx(0.8)
    assert m["mean_class_acc"] == pytest.approx(0.5)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"scores: expected shape \(3, 4\)"):
        classification_metrics(np.zeros((3, 5)), np.zeros(3, dtype=int), 4)
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 4\)"):
        classification_metrics(np.zeros((2, 4)), np.array([0, 4]), 4)


def test_confusion_files_and_table(tmp_path):
    labels = np.array([0, 0, 1, 2, 2, 2])
    scores = np.eye(3)[[0, 1, 1, 2, 2, 0]]
    m = classification_metrics(scores, labels, 3)
    names = ["Walk", "Sitdown", "Drink.Fromcup"]
    csv_path, png_path = write_confusion(m["confusion"], tmp_path / "confusion_val", names)
    rows = list(csv.reader(csv_path.open()))
    assert rows[0] == ["true\\predicted", *names]
    assert [[int(x) for x in r[1:]] for r in rows[1:]] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(m, names)
    assert "Drink.Fromcup" in table and "66.67%" in table and "mean class acc" in table
