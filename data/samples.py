"""Examples of data as users have it: a shop's impression log as one CSV file with string ids (and
a session log and an implicit log, each with a planted sequential signal).

    python -m towerrec.data.samples shop.csv                 # 60,000 impressions, about 4 MB
    python -m towerrec.data.samples shop.csv --rows 200000 --seed 3
    python -m towerrec.data.samples sessions.csv --kind sessions --rows 40000 --users 1000 --items 400
    python -m towerrec.data.samples plays.csv --kind implicit   # user,item,ts only: an implicit log
    python -m towerrec.data.samples drift --kind days --days 8 --rows 20000   # day-00.parquet, ...

Columns: ``user`` ('u0042'), ``item`` ('sku-0137'), ``category`` (text), ``tags`` ('red|sale'),
``price``, ``region``, ``device`` (text, with a real 'NA' category), ``age`` (empty when unknown),
``hour``, ``ts`` (seconds, increasing), and two labels: ``click`` and ``purchase`` (only after a
click). A click follows the user's taste for the item's category, the item's appeal, its price and
the hour; a purchase follows taste, price and age. Nothing here is real data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

CATEGORIES = ["books", "garden", "kitchen", "toys", "shoes", "phones", "games", "tools", "beauty", "music"]
TAGS = ["red", "blue", "sale", "new", "eco", "gift", "bulk", "premium"]
REGIONS = ["north", "south", "east", "west", "centre"]
DEVICES = ["mobile", "desktop", "tablet", "NA"]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def shop_impressions(
    num_rows: int = 60_000, num_users: int = 2_000, num_items: int = 600, seed: int = 0
) -> pa.Table:
    """The impression log (see module docstring); the same seed gives the same table."""
    rng = np.random.default_rng(seed)
    taste = rng.normal(0.0, 1.2, (num_users, len(CATEGORIES)))
    age = rng.integers(18, 75, num_users).astype(float)
    region = rng.integers(0, len(REGIONS), num_users)
    item_category = rng.integers(0, len(CATEGORIES), num_items)
    appeal = rng.normal(0.0, 0.8, num_items)
    price = np.round(np.exp(rng.normal(3.0, 0.9, num_items)), 2)
    tag_sets = [
        sorted(rng.choice(TAGS, rng.integers(0, 3), replace=False).tolist()) for _ in range(num_items)
    ]

    users = np.minimum(rng.zipf(1.3, num_rows) - 1, num_users - 1)
    users = rng.permutation(num_users)[users]
    items = np.minimum(rng.zipf(1.2, num_rows) - 1, num_items - 1)
    items = rng.permutation(num_items)[items]
    hour = rng.integers(0, 24, num_rows)
    device = rng.choice(len(DEVICES), num_rows, p=[0.55, 0.3, 0.1, 0.05])
    evening = ((hour >= 18) & (hour <= 22)).astype(float)
    liking = taste[users, item_category[items]]
    click_p = _sigmoid(-2.2 + 0.9 * liking + appeal[items] - 0.25 * np.log(price[items]) + 0.4 * evening)
    click = rng.random(num_rows) < click_p
    buy_p = _sigmoid(-1.0 + 0.8 * liking - 0.5 * np.log(price[items]) + 0.03 * (age[users] - 45))
    purchase = click & (rng.random(num_rows) < buy_p)
    age_text = np.where(rng.random(num_rows) < 0.03, "", age[users].astype(int).astype(str))
    return pa.table(
        {
            "user": pa.array([f"u{u:04d}" for u in users]),
            "item": pa.array([f"sku-{i:04d}" for i in items]),
            "category": pa.array(np.asarray(CATEGORIES)[item_category[items]]),
            "tags": pa.array(["|".join(tag_sets[i]) for i in items]),
            "price": pa.array(price[items]),
            "region": pa.array(np.asarray(REGIONS)[region[users]]),
            "device": pa.array(np.asarray(DEVICES)[device]),
            "age": pa.array(age_text),
            "hour": pa.array(hour),
            "ts": pa.array(1_700_000_000 + np.sort(rng.integers(0, 90 * 86_400, num_rows))),
            "click": pa.array(click.astype(np.int8)),
            "purchase": pa.array(purchase.astype(np.int8)),
        }
    )


def session_clicks(
    num_users: int = 1_000, steps: int = 20, num_items: int = 400, follow: float = 0.7, seed: int = 0
) -> pa.Table:
    """An impression log with a planted sequential signal: each user's next click is, with
    probability ``follow``, the fixed successor of their last click (else a random item). Each
    step shows two items at one time: the clicked one (click 1) and another (click 0), which half
    of the time is the successor of an older click of the user (so "the successor of something in
    the history" does not tell them apart; only "of the last one" does) and otherwise random.
    Columns: ``user``, ``item``, ``ts``, ``click``."""
    rng = np.random.default_rng(seed)
    successor = rng.permutation(num_items)
    clicks = np.empty((num_users, steps), dtype=np.int64)
    clicks[:, 0] = rng.integers(0, num_items, num_users)
    for t in range(1, steps):
        follows = rng.random(num_users) < follow
        clicks[:, t] = np.where(follows, successor[clicks[:, t - 1]], rng.integers(0, num_items, num_users))
    older = np.zeros((num_users, steps), dtype=np.int64)  # a click at least two steps back
    for t in range(2, steps):
        older[:, t] = clicks[np.arange(num_users), rng.integers(0, t - 1, num_users)]
    hard = (rng.random((num_users, steps)) < 0.5) & (np.arange(steps) >= 2)
    shown = np.where(hard, successor[older], rng.integers(0, num_items, (num_users, steps)))
    users = np.repeat(np.arange(num_users), steps)
    ts = 1_700_000_000 + np.tile(np.arange(steps), num_users) * 3_600 + users
    rows = {
        "user": np.concatenate([users, users]),
        "item": np.concatenate([clicks.ravel(), shown.ravel()]),
        "ts": np.concatenate([ts, ts]),
        "click": np.concatenate([np.ones(users.size, np.int8), np.zeros(users.size, np.int8)]),
    }
    order = np.argsort(rows["ts"], kind="stable")
    return pa.table(
        {
            "user": pa.array([f"u{u:04d}" for u in rows["user"][order]]),
            "item": pa.array([f"i{i:04d}" for i in rows["item"][order]]),
            "ts": pa.array(rows["ts"][order]),
            "click": pa.array(rows["click"][order]),
        }
    )


def implicit_log(
    num_rows: int = 60_000, num_users: int = 2_000, num_items: int = 600, follow: float = 0.5, seed: int = 0
) -> pa.Table:
    """An implicit log (who played what, when; no label) with a planted sequential signal: each
    event is, with probability ``follow``, the fixed successor of the user's previous item, else an
    item drawn by a Zipf-like popularity (so popularity is a real baseline and the sequence beats
    it). Users have from 1 event to about 10 times the mean (``num_rows / num_users``), a few
    fewer than 3. Columns: ``user`` ('u0042'), ``item`` ('i0137'), ``ts`` (seconds, increasing
    per user; users interleave). The same seed gives the same table."""
    rng = np.random.default_rng(seed)
    mean = max(num_rows / num_users, 1.0)
    lengths = np.maximum(1, np.round(rng.lognormal(np.log(mean) - 0.5, 1.0, num_users)).astype(np.int64))
    lengths = np.minimum(lengths, int(10 * mean) + 1)
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.8
    popular = rng.permutation(num_items)  # rank r → item popular[r]
    successor = rng.permutation(num_items)
    steps = int(lengths.max())
    items = np.zeros((num_users, steps), dtype=np.int64)
    items[:, 0] = popular[rng.choice(num_items, num_users, p=popularity / popularity.sum())]
    for t in range(1, steps):
        follows = rng.random(num_users) < follow
        drawn = popular[rng.choice(num_items, num_users, p=popularity / popularity.sum())]
        items[:, t] = np.where(follows, successor[items[:, t - 1]], drawn)
    gaps = rng.integers(60, 3 * 86_400, (num_users, steps))
    start = rng.integers(0, 30 * 86_400, num_users)
    ts = 1_700_000_000 + start[:, None] + np.cumsum(gaps, axis=1)
    kept = np.arange(steps)[None, :] < lengths[:, None]
    users = np.broadcast_to(np.arange(num_users)[:, None], (num_users, steps))[kept]
    items, ts = items[kept], ts[kept]
    order = np.argsort(ts, kind="stable")
    return pa.table(
        {
            "user": pa.array([f"u{u:04d}" for u in users[order]]),
            "item": pa.array([f"i{i:04d}" for i in items[order]]),
            "ts": pa.array(ts[order]),
        }
    )


def drifting_days(
    num_days: int = 8,
    rows_per_day: int = 20_000,
    num_users: int = 1_500,
    new_users_per_day: int = 400,
    num_items: int = 300,
    new_items_per_day: int = 120,
    item_lifetime_days: float = 1.5,
    seed: int = 0,
) -> list[pa.Table]:
    """An impression log that keeps changing, one table per day: where a vocabulary frozen on day 0
    visibly fails and a model trained day by day keeps up.

    Every day ``new_users_per_day`` users and ``new_items_per_day`` items appear (integer ids never
    seen before; a new user is three times as active on their first day). An item's share of the
    traffic decays with its age (``exp(-age / item_lifetime_days)``: popularity drifts to the new
    items, so most of a day's impressions are of items a few days old). A click follows the dot
    product of hidden user and item factors, the item's own quality (learnable from its id only)
    and the user's taste for the item's category (a stable feature). Columns: ``user``, ``item``,
    ``category``, ``hour``, ``day``, ``ts``, ``click``, and ``user_key`` (the user id again, to keep
    as an ``other`` column that groups evaluation rows by user whatever the id mapping: GAUC).
    """
    rng = np.random.default_rng(seed)
    factor_dim, num_categories = 8, 12
    total_users = num_users + new_users_per_day * num_days
    total_items = num_items + new_items_per_day * num_days
    user_factors = rng.normal(0, 1 / np.sqrt(factor_dim), (total_users, factor_dim))
    item_factors = rng.normal(0, 1 / np.sqrt(factor_dim), (total_items, factor_dim))
    user_bias = rng.normal(0, 0.5, total_users)
    item_quality = rng.normal(0, 1.2, total_items)
    item_appeal = rng.lognormal(0, 1.0, total_items)  # traffic share at launch
    item_category = rng.integers(0, num_categories, total_items)
    taste = rng.normal(0, 0.8, (total_users, num_categories))
    activity = rng.lognormal(0, 0.8, total_users)
    user_born = np.concatenate(
        [np.zeros(num_users), 1 + np.arange(new_users_per_day * num_days) // new_users_per_day]
    )
    item_born = np.concatenate(
        [np.zeros(num_items), 1 + np.arange(new_items_per_day * num_days) // new_items_per_day]
    )
    user_born, item_born = user_born - 1, item_born - 1  # day 0's users and items exist from before
    user_ids = rng.permutation(total_users) + 1  # ids do not tell a user's age
    item_ids = rng.permutation(total_items) + 1
    days = []
    for day in range(num_days):
        alive_users = np.flatnonzero(user_born <= day)
        user_weight = activity[alive_users] * np.where(user_born[alive_users] == day, 3.0, 1.0)
        alive_items = np.flatnonzero(item_born <= day)
        age = day - np.maximum(item_born[alive_items], -1)
        item_weight = item_appeal[alive_items] * np.exp(-age / item_lifetime_days)
        users = alive_users[rng.choice(len(alive_users), rows_per_day, p=user_weight / user_weight.sum())]
        items = alive_items[rng.choice(len(alive_items), rows_per_day, p=item_weight / item_weight.sum())]
        hour = rng.integers(0, 24, rows_per_day)
        logit = (
            -0.8
            + 1.5 * np.einsum("ij,ij->i", user_factors[users], item_factors[items])
            + item_quality[items]
            + user_bias[users]
            + taste[users, item_category[items]]
        )
        click = rng.random(rows_per_day) < _sigmoid(logit)
        ts = 1_700_000_000 + day * 86_400 + np.sort(rng.integers(0, 86_400, rows_per_day))
        days.append(
            pa.table(
                {
                    "user": pa.array(user_ids[users].astype(np.int64)),
                    "item": pa.array(item_ids[items].astype(np.int64)),
                    "category": pa.array(item_category[items].astype(np.int64) + 1),
                    "hour": pa.array(hour.astype(np.float64)),
                    "day": pa.array(np.full(rows_per_day, day, dtype=np.int64)),
                    "ts": pa.array(ts),
                    "click": pa.array(click.astype(np.int8)),
                    "user_key": pa.array(user_ids[users].astype(np.int64)),
                }
            )
        )
    return days


def write_csv(table: pa.Table, out: Path) -> None:
    with out.open("wb") as sink:
        sink.write((",".join(table.column_names) + "\n").encode())
        pacsv.write_csv(table, sink, pacsv.WriteOptions(include_header=False, quoting_style="none"))


def write_days(days: list[pa.Table], folder: Path) -> list[Path]:
    """One Parquet file per day, ``day-00.parquet`` on, in a new folder."""
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    files = [folder / f"day-{day:02d}.parquet" for day in range(len(days))]
    for table, file in zip(days, files):
        pq.write_table(table, file)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="CSV file to write (must not exist)")
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--items", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kind", choices=("shop", "sessions", "implicit", "days"), default="shop",
        help="shop: the impression log above; sessions: clicks with a planted sequential signal; "
        "implicit: user,item,ts events (no label) with a planted sequential signal; days: a log that "
        "drifts day by day (new users and items every day), one Parquet file per day in OUTPUT",
    )  # fmt: skip
    parser.add_argument("--days", type=int, default=8, help="days (--kind days)")
    args = parser.parse_args(argv)
    out = Path(args.output)
    if out.exists():
        print(f"error: {out} exists; choose a new file", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.kind == "days":
        write_days(drifting_days(args.days, args.rows, seed=args.seed), out)
        print(f"wrote {out}: {args.days} days of {args.rows:,} impressions (day-00.parquet, ...)")
        return 0
    if args.kind == "implicit":
        table = implicit_log(args.rows, args.users, args.items, seed=args.seed)
        write_csv(table, out)
        print(
            f"wrote {out}: {table.num_rows:,} events of {args.users:,} users on {args.items:,} items (no label)"
        )
        return 0
    if args.kind == "sessions":
        table = session_clicks(args.users, max(args.rows // (2 * args.users), 2), args.items, seed=args.seed)
        write_csv(table, out)
        print(f"wrote {out}: {table.num_rows:,} impressions of {args.users:,} users")
        return 0
    table = shop_impressions(args.rows, args.users, args.items, args.seed)
    write_csv(table, out)
    clicks, purchases = int(np.sum(table["click"])), int(np.sum(table["purchase"]))
    print(f"wrote {out}: {table.num_rows:,} impressions, {clicks:,} clicks, {purchases:,} purchases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
