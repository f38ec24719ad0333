"""Statistics shared by the experiment scripts (the Rust reports compute the
same in `cram-eval`'s `stats`; these are for the ad-hoc tables)."""
from math import comb


def mcnemar(only_a, only_b):
    """Exact two-sided McNemar p-value from the discordant pairs: facts only
    the first method recalled, and facts only the second did."""
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    tail = sum(comb(discordant, k) for k in range(min(only_a, only_b) + 1)) / 2**discordant
    return min(1.0, 2 * tail)
