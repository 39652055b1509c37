"""The token-exact mixer: one global stream of packed sequences drawn from every source by share.

Every sequence has exactly ``seqLength`` tokens and comes from one source, so mixing sequences by count is mixing
tokens. Shares are integers: a domain source i gets ``domainPercent * w_i * W_general`` and a general source j gets
``(100 - domainPercent) * w_j * W_domain`` (W = sum of the group's weights). Sources are picked by smooth weighted
round robin over these integers, so after n sequences every source has its exact share of n within one sequence,
with no randomness to drift. The stream is the same on every rank; each rank keeps its own slice (see loader).

Mixed by loss tokens (``data.mixBy: lossTokens``), the next sequence comes from the source furthest behind its
share of the tokens that carry loss so far (ties to the lowest index): after n sequences every source's loss tokens
are within one sequence's of their share. The counters that decide are the sources' own, so the state is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

from forge_trainer.data.pack import PackedSource, SourceState
from forge_trainer.errors import DataError

DOMAIN = "domain"
GENERAL = "general"

# Mixed by loss tokens, a source that gave this many sequences without one token that carries loss would be drawn
# forever: the run fails instead, naming it.
LOSSLESS_SEQUENCES_LIMIT = 64


def integer_shares(domain_weights: list[int], general_weights: list[int], domain_percent: int) -> list[int]:
    """Integer share of each source (domain sources first), proportional to its share of tokens."""
    wd = sum(domain_weights)
    wg = sum(general_weights) or 1
    dom = [domain_percent * w * wg for w in domain_weights]
    gen = [(100 - domain_percent) * w * wd for w in general_weights]
    return dom + gen


@dataclass(frozen=True)
class MixedSequence:
    """A sequence with the index of the source it came from."""

    source: int
    ids: Any
    mask: Any
    positions: Any


class Mixer:
    """Draws sequences from sources by integer share; its state resumes the stream exactly."""

    def __init__(
        self,
        sources: list[PackedSource],
        groups: list[str],
        shares: list[int],
        state: dict[str, Any] | None = None,
        by_loss_tokens: bool = False,
    ) -> None:
        if not (len(sources) == len(groups) == len(shares)):
            raise ValueError("sources, groups and shares must have the same length")
        self.sources = sources
        self.groups = groups
        self.shares = shares
        self.total = sum(shares)
        self.current = list(state["current"]) if state else [0] * len(shares)
        self.n = int(state["n"]) if state else 0
        self.by_loss_tokens = by_loss_tokens

    def pick(self) -> int:
        """The source of the next sequence (advances the round robin)."""
        if self.by_loss_tokens:
            return self._pick_by_loss_tokens()
        best = -1
        for i, share in enumerate(self.shares):
            if share == 0:
                continue
            self.current[i] += share
            if best < 0 or self.current[i] > self.current[best]:
                best = i
        self.current[best] -= self.total
        self.n += 1
        return best

    def _pick_by_loss_tokens(self) -> int:
        counters = [s.counters for s in self.sources]
        best = -1
        for i, share in enumerate(self.shares):
            if share == 0:
                continue
            # loss_i / share_i < loss_best / share_best, in integers.
            if best < 0 or counters[i].loss_tokens * self.shares[best] < counters[best].loss_tokens * share:
                best = i
        if counters[best].loss_tokens == 0 and counters[best].sequences >= LOSSLESS_SEQUENCES_LIMIT:
            raise DataError(
                f"source {self.sources[best].uri}: {counters[best].sequences} sequences without a token that carries "
                "loss (no assistant turns?): data.mixBy lossTokens cannot fill its share"
            )
        self.n += 1
        return best

    def next(self) -> MixedSequence:
        """The next sequence of the global stream."""
        i = self.pick()
        seq = self.sources[i].next_sequence()
        return MixedSequence(i, seq.ids, seq.mask, seq.positions)

    def state(self) -> dict[str, Any]:
        """JSON-friendly state: round-robin counters and every source's state."""
        return {
            "n": self.n,
            "current": list(self.current),
            "sources": [s.state().to_json() for s in self.sources],
        }

    def report(self) -> MixReport:
        """The realised mix of the stream generated so far."""
        return mix_report(self.state(), self.groups, self.shares, [s.uri for s in self.sources])


class MixReport(TypedDict):
    """The realised mix (the finished event, state.json, status.latest): totals, and one row per source."""

    sequences: int
    tokens: int
    domainTokens: int
    generalTokens: int
    realisedDomainPercent: float
    domainLossTokens: int
    generalLossTokens: int
    realisedDomainGradientPercent: float
    sources: list[dict[str, Any]]


def mix_report(state: dict[str, Any], groups: list[str], shares: list[int], uris: list[str]) -> MixReport:
    """The realised mix up to a data state: tokens per source and group, and the realised domain percent."""
    total_share = sum(shares)
    per_source: list[dict[str, Any]] = []
    group_tokens = {DOMAIN: 0, GENERAL: 0}
    group_loss_tokens = {DOMAIN: 0, GENERAL: 0}
    for src, group, share, uri in zip(state["sources"], groups, shares, uris, strict=True):
        c = src["counters"]
        group_tokens[group] += c["consumed_tokens"]
        group_loss_tokens[group] += c["loss_tokens"]
        per_source.append(
            {
                "group": group,
                "uri": uri,
                "targetPercent": 100.0 * share / total_share,
                "tokens": c["consumed_tokens"],
                "lossTokens": c["loss_tokens"],
                "sequences": c["sequences"],
                "passes": (c["consumed_tokens"] / c["pass_tokens"]) if c["pass_tokens"] else None,
                "badLines": c["bad_lines"],
            }
        )
    total = sum(group_tokens.values())
    total_loss = sum(group_loss_tokens.values())
    for row in per_source:
        row["realisedPercent"] = 100.0 * row["tokens"] / total if total else 0.0
    return {
        "sequences": state["n"],
        "tokens": total,
        "domainTokens": group_tokens[DOMAIN],
        "generalTokens": group_tokens[GENERAL],
        "realisedDomainPercent": 100.0 * group_tokens[DOMAIN] / total if total else 0.0,
        "domainLossTokens": group_loss_tokens[DOMAIN],
        "generalLossTokens": group_loss_tokens[GENERAL],
        "realisedDomainGradientPercent": 100.0 * group_loss_tokens[DOMAIN] / total_loss if total_loss else 0.0,
        "sources": per_source,
    }


def source_states(state: dict[str, Any] | None, n: int) -> list[SourceState | None]:
    """Per-source states out of a mixer state (None for a fresh start, or for a source added by a rebalance)."""
    if state is None:
        return [None] * n
    raw = state["sources"]
    if len(raw) != n:
        raise ValueError(f"data state has {len(raw)} sources, config has {n}")
    return [None if s is None else SourceState.from_json(s) for s in raw]
