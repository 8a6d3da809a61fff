"""The ledger's rollups and the SQL that keeps them, shared by the writer and ``reprice``.

``daily_usage`` (day x end user x key x provider x model), ``daily_users`` and
``monthly_users`` (day or calendar month x end user x key) and ``daily_totals`` (day x key x
provider x model, with the requests that had no end user) are all changed in the transaction
that changes the rows they sum, from the same CTE of rows, so they always agree with
``tollgate.requests`` and with each other.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ROLLUPS", "Rollup", "reprice_ctes", "rollup_ctes"]

# Summed columns every rollup has, with the aggregate that fills each from request rows.
_SUMS: tuple[tuple[str, str], ...] = (
    ("requests", "count(*)"),
    ("blocked", "count(*) FILTER (WHERE outcome = 'blocked')"),
    ("input_tokens", "coalesce(sum(input_tokens), 0)"),
    ("cached_input_tokens", "coalesce(sum(cached_input_tokens), 0)"),
    ("cache_write_tokens", "coalesce(sum(cache_write_tokens), 0)"),
    ("output_tokens", "coalesce(sum(output_tokens), 0)"),
    ("reasoning_tokens", "coalesce(sum(reasoning_tokens), 0)"),
    ("total_tokens", "coalesce(sum(total_tokens), 0)"),
    ("cost_usd", "coalesce(sum(cost_usd), 0)"),
    ("unpriced_requests", "count(*) FILTER (WHERE cost_usd IS NULL AND outcome <> 'blocked')"),
)

# Key columns: "none" is stored as '' so that the primary key can cover it.
_KEY_EXPR = {
    "day": "(created_at AT TIME ZONE 'UTC')::date",
    "month": "date_trunc('month', created_at AT TIME ZONE 'UTC')::date",
    "end_user_id": "coalesce(end_user_id, '')",
    "key_id": "coalesce(key_id, '')",
    "provider": "coalesce(provider, '')",
    "model": "coalesce(model, '')",
}


@dataclass(frozen=True)
class Rollup:
    table: str
    keys: tuple[str, ...]
    extra: tuple[tuple[str, str], ...] = ()  # more summed columns: (name, aggregate)

    @property
    def sums(self) -> tuple[tuple[str, str], ...]:
        return (*_SUMS, *self.extra)


ROLLUPS: tuple[Rollup, ...] = (
    Rollup("daily_usage", ("day", "end_user_id", "key_id", "provider", "model")),
    Rollup("daily_users", ("day", "end_user_id", "key_id")),
    Rollup("monthly_users", ("month", "end_user_id", "key_id")),
    Rollup(
        "daily_totals",
        ("day", "key_id", "provider", "model"),
        extra=(("unattributed", "count(*) FILTER (WHERE end_user_id IS NULL)"),),
    ),
)


def _upsert(rollup: Rollup, source: str) -> str:
    keys = ", ".join(rollup.keys)
    names = ", ".join(name for name, _ in rollup.sums)
    exprs = ",\n           ".join(_KEY_EXPR[k] for k in rollup.keys)
    aggs = ",\n           ".join(agg for _, agg in rollup.sums)
    positions = ", ".join(str(n) for n in range(1, len(rollup.keys) + 1))
    sets = ",\n        ".join(f"{n} = r.{n} + EXCLUDED.{n}" for n, _ in rollup.sums)
    return f"""
    INSERT INTO tollgate.{rollup.table} AS r ({keys}, {names})
    SELECT {exprs},
           {aggs}
    FROM {source}
    GROUP BY {positions}
    -- Concurrent batches lock rollup rows in one order, so they cannot deadlock.
    ORDER BY {positions}
    ON CONFLICT ({keys}) DO UPDATE SET
        {sets}
    RETURNING 1"""


def rollup_ctes(source: str) -> str:
    """``rolled_<table> AS (…)`` CTEs adding the rows of CTE ``source`` to every rollup."""
    return ",\n".join(f"rolled_{r.table} AS ({_upsert(r, source)}\n)" for r in ROLLUPS)


def _reprice(rollup: Rollup, source: str) -> str:
    exprs = ", ".join(f"{_KEY_EXPR[k]} AS {k}" for k in rollup.keys)
    positions = ", ".join(str(n) for n in range(1, len(rollup.keys) + 1))
    return f"""
    UPDATE tollgate.{rollup.table} AS r
    SET cost_usd = r.cost_usd + p.cost, unpriced_requests = r.unpriced_requests - p.n
    FROM (SELECT {exprs}, sum(cost_usd) AS cost, count(*) AS n
          FROM {source} GROUP BY {positions}) AS p
    WHERE ({", ".join(f"r.{k}" for k in rollup.keys)})
        = ({", ".join(f"p.{k}" for k in rollup.keys)})
    RETURNING 1"""


def reprice_ctes(source: str) -> str:
    """CTEs moving the newly priced rows of CTE ``source`` from unpriced to cost in every
    rollup (``source`` must return created_at, end_user_id, key_id, provider, model and
    the new cost_usd)."""
    return ",\n".join(f"repriced_{r.table} AS ({_reprice(r, source)}\n)" for r in ROLLUPS)


def _mismatches(rollup: Rollup) -> str:
    keys = ", ".join(rollup.keys)
    exprs = ",\n               ".join(f"{_KEY_EXPR[k]} AS {k}" for k in rollup.keys)
    names = ", ".join(name for name, _ in rollup.sums)
    aggs = ",\n               ".join(f"{agg} AS {name}" for name, agg in rollup.sums)
    positions = ", ".join(str(n) for n in range(1, len(rollup.keys) + 1))
    return f"""
    SELECT count(*) FROM (
        (SELECT {keys}, {names} FROM tollgate.{rollup.table} WHERE requests > 0
         EXCEPT ALL
         SELECT {exprs},
               {aggs}
         FROM tollgate.requests GROUP BY {positions})
        UNION ALL
        (SELECT {exprs},
               {aggs}
         FROM tollgate.requests GROUP BY {positions}
         EXCEPT ALL
         SELECT {keys}, {names} FROM tollgate.{rollup.table} WHERE requests > 0)
    ) AS differing"""


def mismatch_query() -> str:
    """One row, one column per rollup: how many of its groups differ from the sums over
    ``tollgate.requests`` (all zero when they agree; run it before pruning, which keeps
    the rollups and drops the detail)."""
    return "SELECT " + ",\n".join(f"({_mismatches(r)}) AS {r.table}" for r in ROLLUPS)


def derive_from_daily_usage() -> list[str]:
    """``INSERT … SELECT`` statements filling every other rollup from ``daily_usage`` (they
    are all coarser): what migration 009 did, for a ledger loaded in bulk (benchmarks)."""
    out = []
    for rollup in ROLLUPS:
        if rollup.table == "daily_usage":
            continue
        keys = ", ".join(rollup.keys)
        exprs = ", ".join(
            "date_trunc('month', day)::date" if k == "month" else k for k in rollup.keys
        )
        sums = [f"sum({name})" for name, _ in _SUMS]
        sums += ["coalesce(sum(requests) FILTER (WHERE end_user_id = ''), 0)" for _ in rollup.extra]
        names = ", ".join([name for name, _ in rollup.sums])
        positions = ", ".join(str(n) for n in range(1, len(rollup.keys) + 1))
        out.append(
            f"INSERT INTO tollgate.{rollup.table} ({keys}, {names})"
            f" SELECT {exprs}, {', '.join(sums)} FROM tollgate.daily_usage GROUP BY {positions}"
        )
    return out
