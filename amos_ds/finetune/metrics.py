"""GLUE's metrics: accuracy, F1 of the positive class, Matthews correlation (CoLA), Pearson and Spearman
correlation (STS-B). Plain functions of predictions and gold labels, as scikit-learn and SciPy define them."""

import math
import statistics


def accuracy(predicted: list[int], gold: list[int]) -> float:
    return sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)


def f1(predicted: list[int], gold: list[int], positive: int = 1) -> float:
    """F1 of class `positive` (GLUE's F1 for MRPC and QQP: label 1); 0 when it is never predicted nor gold."""
    pairs = list(zip(predicted, gold, strict=True))
    true_positive = sum(p == g == positive for p, g in pairs)
    predicted_positive = sum(p == positive for p, _ in pairs)
    gold_positive = sum(g == positive for _, g in pairs)
    if not predicted_positive + gold_positive:
        return 0.0
    return 2 * true_positive / (predicted_positive + gold_positive)


def matthews(predicted: list[int], gold: list[int]) -> float:
    """Matthews correlation for any number of classes (Gorodkin's R_K, scikit-learn's formula); 0 when undefined."""
    pairs = list(zip(predicted, gold, strict=True))
    classes = sorted(set(predicted) | set(gold))
    samples, correct = len(pairs), sum(p == g for p, g in pairs)
    predicted_count = [sum(p == c for p, _ in pairs) for c in classes]
    gold_count = [sum(g == c for _, g in pairs) for c in classes]
    covariance = correct * samples - sum(p * g for p, g in zip(predicted_count, gold_count))
    spread = (samples ** 2 - sum(p * p for p in predicted_count)) * (samples ** 2 - sum(g * g for g in gold_count))
    return covariance / math.sqrt(spread) if spread else 0.0


def pearson(predicted: list[float], gold: list[float]) -> float:
    """Pearson's r; 0 when either side is constant (undefined)."""
    try:
        return statistics.correlation(predicted, gold)
    except statistics.StatisticsError:
        return 0.0


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(predicted: list[float], gold: list[float]) -> float:
    """Spearman's rho: Pearson's r of the (tie-averaged) ranks."""
    return pearson(ranks(predicted), ranks(gold))


def classification_metrics(predicted: list[int], gold: list[int], num_labels: int) -> dict[str, float]:
    metrics = {"accuracy": accuracy(predicted, gold), "matthews": matthews(predicted, gold)}
    if num_labels == 2:
        metrics["f1"] = f1(predicted, gold)
    return metrics


def regression_metrics(predicted: list[float], gold: list[float]) -> dict[str, float]:
    return {"pearson": pearson(predicted, gold), "spearman": spearman(predicted, gold),
            "mse": statistics.fmean((p - g) ** 2 for p, g in zip(predicted, gold, strict=True))}
