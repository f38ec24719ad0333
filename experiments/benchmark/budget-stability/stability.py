"""How much each (layer, KV head)'s share of spread budgets moves from span
to span, and how many entries a profile of other spans moves against each
span's own budgets. Reads the JSON lines of the head_shares example
(shares-250.jsonl: grid-250-s3's 48 spans, then calibration-250's 40;
shares-1000.jsonl: calibration-1000's 10). Standard library only.

    python3 experiments/benchmark/budget-stability/stability.py
"""
import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent


def allocate(total, weights, cap):
    """cram's D'Hondt apportionment (matching/budgets.rs): each next entry to
    the head of largest weight / (entries + 1) with room, ties to the earlier."""
    entries = [1] * len(weights)
    for _ in range(len(weights), total):
        best = max((h for h in range(len(weights)) if entries[h] < cap), key=lambda h: (weights[h] / (entries[h] + 1), -h))
        entries[best] += 1
    return entries


def budget(n, ratio):
    return max(1, round(n / ratio))


def moved(span, profile, ratio):
    """Share of a span's entries that sit in another head under the profile."""
    t = budget(span["n"], ratio)
    total = t * len(profile)
    own = allocate(total, span["shares"], span["n"])
    other = allocate(total, profile, span["n"])
    return sum(abs(a - b) for a, b in zip(own, other)) / 2 / total


def mean_profile(spans):
    return [statistics.fmean(column) for column in zip(*(s["shares"] for s in spans))]


def correlation(x, y):
    mx, my = statistics.fmean(x), statistics.fmean(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / (sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y)) ** 0.5


def main():
    spans = [json.loads(line) for line in open(HERE / "shares-250.jsonl")]
    train = [s for s in spans if s["case"].startswith("gen-s3")]
    test = [s for s in spans if s["case"].startswith("gen-s1")]
    long = [json.loads(line) for line in open(HERE / "shares-1000.jsonl")]
    profile = mean_profile(train)
    spread = [statistics.pstdev(column) / statistics.fmean(column) for column in zip(*(s["shares"] for s in train))]
    print(f"{len(profile)} heads; profile of {len(train)} spans (grid-250-s3), tested on {len(test)} (calibration-250) and {len(long)} ~1,000-token spans")
    print(f"a head's share across the {len(train)} spans: relative spread {statistics.median(spread):.3f} (median over heads), {max(spread):.3f} at most")
    cors = [correlation(s["shares"], profile) for s in test]
    print(f"correlation of a 250-token span's shares with the profile: median {statistics.median(cors):.3f}, lowest {min(cors):.3f}")
    cors = [correlation(s["shares"], profile) for s in long]
    print(f"correlation of a ~1,000-token span's shares with the profile: median {statistics.median(cors):.3f}, lowest {min(cors):.3f}")
    for ratio in (1.6, 3.2, 4.8, 6.4):
        short = [moved(s, profile, ratio) for s in test]
        across = [moved(s, profile, ratio) for s in long]
        own_length = [moved(s, mean_profile(long[:i] + long[i + 1 :]), ratio) for i, s in enumerate(long)]
        print(
            f"{ratio}x: entries moved by the profile: 250-token spans median {statistics.median(short):.3f} (at most {max(short):.3f}); "
            f"~1,000-token spans {statistics.median(across):.3f}; by a profile of the other ~1,000-token spans {statistics.median(own_length):.3f}"
        )


main()
