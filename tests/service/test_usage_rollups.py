"""Expert usage roll-ups give exactly what summing every raw window gave (a brute-force reference), before,
during and after folding, on PostgreSQL and SQLite; folded raw rows past their retention go."""
from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
import torch
from sqlalchemy import func, select

from peer_model.usage import usage_stats
from service.api.routes.experts import layer_utilization, utilization_history
from service.db.migrate import upgrade
from service.db.models import ExpertUsage, ExpertUsageBucket, ExpertUsageTotal, PoolVersion
from service.db.session import make_engine, make_session_factory, transaction
from service.serving.engine import decode_usage, encode_usage
from service.serving.usage import fold_usage, prune_raw_usage

EXPERTS = 64
BUCKET = 3600
START = (datetime.now(timezone.utc) - timedelta(days=2)).replace(minute=17, second=0, microsecond=0)


@pytest.fixture(params=["postgresql", "sqlite"])
def sessions(request, tmp_path):
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'peer.db'}"
        upgrade(url)
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


def make_version(sessions) -> PoolVersion:
    with transaction(sessions) as session:
        version = PoolVersion(checkpoint=f"versions/test-{random.getrandbits(48)}", model_config_json={},
                              experts={"1": EXPERTS, "3": EXPERTS},
                              segments={key: [{"start": 0, "end": EXPERTS, "rows": 8, "cols": 8, "tag": "",
                                               "corpus_ids": []}] for key in ("1", "3")}, corpus_ids=[])
        session.add(version)
    return version


def add_windows(sessions, version_id: int, count: int, start: datetime, seed: int) -> None:
    """``count`` flush windows of 7 minutes on layers 1 and 3, sparse random counters."""
    rng = random.Random(seed)
    with transaction(sessions) as session:
        for index in range(count):
            begin = start + timedelta(minutes=7 * index)
            for layer in (1, 3):
                counts = torch.zeros(EXPERTS, dtype=torch.long)
                for expert in rng.sample(range(EXPERTS), rng.randint(1, 12)):
                    counts[expert] = rng.randint(1, 50)
                blob, _ = encode_usage(counts)
                session.add(ExpertUsage(version_id=version_id, layer=layer, window_start=begin,
                                        window_end=begin + timedelta(minutes=7), tokens=rng.randint(1, 500),
                                        counts=blob))


def raw_rows(sessions, version_id: int, layer: int, until: datetime | None = None) -> list[ExpertUsage]:
    with sessions() as session:
        query = select(ExpertUsage).where(ExpertUsage.version_id == version_id, ExpertUsage.layer == layer)
        if until is not None:
            query = query.where(ExpertUsage.window_end <= until)
        return session.scalars(query).all()


def brute_force(rows: list[ExpertUsage]) -> tuple[torch.Tensor, int, int]:
    counts = torch.zeros(EXPERTS, dtype=torch.long)
    for row in rows:
        counts += decode_usage(row.counts, EXPERTS)
    return counts, sum(row.tokens for row in rows), len(rows)


def check_utilization(sessions, version: PoolVersion, reference: dict[int, list[ExpertUsage]]) -> None:
    with sessions() as session:
        for layer, rows in reference.items():
            counts, tokens, windows = brute_force(rows)
            view = layer_utilization(session, version, str(layer), top=5, bins=4, cells=True)
            expected = usage_stats(counts, 5).to_dict()
            assert {key: view[key] for key in expected} == expected
            assert (view["tokens"], view["windows"]) == (tokens, windows)
            assert sum(map(sum, view["cells"])) == int(counts.sum())


def check_history(sessions, version: PoolVersion, layer: int, points: int = 1000) -> list[dict]:
    with sessions() as session:
        history = utilization_history(session, version, str(layer), BUCKET, points)
    for point in history:
        counts, tokens, _ = brute_force(raw_rows(sessions, version.id, layer, datetime.fromisoformat(point["at"])))
        stats = usage_stats(counts, 1)
        assert (point["tokens"], point["usage_fraction"], point["kl_from_uniform"]) == (
            tokens, stats.usage_fraction, stats.kl_from_uniform)
    return history


def test_rolled_up_usage_equals_the_sum_of_every_raw_window(sessions):
    version = make_version(sessions)
    add_windows(sessions, version.id, 40, START, seed=1)  # 40 windows of 7 minutes: 5 hourly buckets
    everything = {layer: raw_rows(sessions, version.id, layer) for layer in (1, 3)}
    check_utilization(sessions, version, everything)  # nothing folded yet: all raw
    unfolded_history = check_history(sessions, version, 1)
    assert len(unfolded_history) == 5  # windows ending hh:24 .. hh+4:57: one point per hour bucket

    assert fold_usage(sessions, BUCKET, batch=25) == 80  # several fold transactions
    assert fold_usage(sessions, BUCKET) == 0  # folding again adds nothing
    with sessions() as session:
        totals = session.scalars(select(ExpertUsageTotal).where(ExpertUsageTotal.version_id == version.id)).all()
        buckets = session.scalar(select(func.count(ExpertUsageBucket.id)).where(
            ExpertUsageBucket.version_id == version.id, ExpertUsageBucket.layer == 1))
    assert sorted(total.layer for total in totals) == [1, 3] and buckets == 5
    check_utilization(sessions, version, everything)
    assert check_history(sessions, version, 1) == unfolded_history

    # windows served since the last fold are read beside the roll-ups, in the same and in new buckets
    add_windows(sessions, version.id, 12, START + timedelta(minutes=7 * 40), seed=2)
    everything = {layer: raw_rows(sessions, version.id, layer) for layer in (1, 3)}
    check_utilization(sessions, version, everything)
    assert len(check_history(sessions, version, 3)) == 7
    assert len(check_history(sessions, version, 3, points=3)) == 3


def test_folded_raw_rows_past_their_retention_are_deleted_and_the_answers_stay(sessions):
    version = make_version(sessions)
    add_windows(sessions, version.id, 20, START, seed=3)
    everything = {layer: raw_rows(sessions, version.id, layer) for layer in (1, 3)}
    history = check_history(sessions, version, 3)
    prune_raw_usage(sessions, 0)
    assert len(raw_rows(sessions, version.id, 1)) == 20  # never a row that is not folded yet
    fold_usage(sessions, BUCKET)
    prune_raw_usage(sessions, 3 * 86400)
    assert len(raw_rows(sessions, version.id, 1)) == 20  # folded, but within the retention
    assert prune_raw_usage(sessions, 0) >= 40
    assert raw_rows(sessions, version.id, 1) == raw_rows(sessions, version.id, 3) == []
    check_utilization(sessions, version, everything)  # from the roll-ups alone
    with sessions() as session:
        assert utilization_history(session, version, "3", BUCKET, 1000) == history
