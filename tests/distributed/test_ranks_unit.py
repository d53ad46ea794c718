"""The parts of distributed support that need no second process: rank detection, sharding, refusals."""

from __future__ import annotations

import pytest

from onthefly.mixins import distributed
from onthefly.ranks import RankGroup, launched_as_follower
from onthefly.session.base import OnTheFlySessionBase
from onthefly.session.config import ConfigError, SessionConfig
from onthefly.session.delegate import FrameworkDelegate


@pytest.mark.parametrize(("env", "follower"), [
    ({}, False), ({"RANK": "0"}, False), ({"RANK": "1"}, True), ({"LOCAL_RANK": "1"}, True),
    ({"LOCAL_RANK": "0", "NODE_RANK": "2"}, True), ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, False),
    ({"RANK": "0", "LOCAL_RANK": "3"}, False),  # torchrun's global RANK wins over the local one
])
def test_a_follower_is_known_from_the_launcher_before_the_group_exists(monkeypatch, env, follower):
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launched_as_follower() is follower


def test_shards_cover_every_item_once_and_interleave_back_in_order():
    items = list(range(1001))
    shards = []
    for rank in range(3):
        group = object.__new__(RankGroup)
        group.rank, group.world = rank, 3
        shards.append(group.shard(items))
    assert sorted(x for s in shards for x in s) == items and [len(s) for s in shards] == [334, 334, 333]
    assert group.interleave(shards) == items


class Runtime(FrameworkDelegate):
    def __init__(self, name: str) -> None:
        self.runtime = name


@pytest.mark.parametrize("runtime", ["hf", "accelerate"])
def test_multi_process_hf_and_accelerate_runs_are_refused_by_name(monkeypatch, tmp_path, runtime):
    monkeypatch.setattr(distributed, "process_group_world", lambda: 2)
    session = OnTheFlySessionBase(SessionConfig(transport="off", save_dir=str(tmp_path)), framework=Runtime(runtime))
    try:
        with pytest.raises(RuntimeError, match=f"does not steer a multi-process '{runtime}' run yet"):
            session.join_ranks()
        assert session.ranks is None
    finally:
        session.close()


@pytest.mark.parametrize(("name", "value"), [("dist_sync_every_steps", 0), ("dist_timeout_s", 0),
                                             ("dist_timeout_s", "soon")])
def test_distributed_settings_are_validated(name, value):
    with pytest.raises(ConfigError, match=name):
        SessionConfig(**{name: value})
