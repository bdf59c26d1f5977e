"""Sweep expansion, trial names and shards: pure bookkeeping, checked exactly."""
import itertools

import pytest

import reparam
from configs import common
from experiments import sweep


def test_product_and_zip_are_exact():
  a = common.sweep("reparam.transform", ["none", "weight_norm", "multipliers(row=True)"])
  b = common.zip_(common.sweep("optimizer.name", ["adamw", "muon"]),
                  common.sweep("optimizer.learning_rate", [3e-3, 2e-2]))
  s = common.sweep("seed", [0, 1])
  got = common.product(a, b, s)
  want = [{"reparam.transform": t, "optimizer.name": o, "optimizer.learning_rate": lr, "seed": seed}
          for t, (o, lr), seed in itertools.product(["none", "weight_norm", "multipliers(row=True)"],
                                                    [("adamw", 3e-3), ("muon", 2e-2)], [0, 1])]
  assert got == want
  assert common.concat(a, s) == a + s
  with pytest.raises(ValueError, match="one length"):
    common.zip_(a, s)


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shards_are_disjoint_and_cover(n):
  trials = [{"index": i} for i in range(20)]
  shares = [sweep.shard(trials, k, n) for k in range(n)]
  indices = [t["index"] for share in shares for t in share]
  assert sorted(indices) == list(range(20)) and len(indices) == len(set(indices))


def test_parse_shard_rejects_bad_input():
  assert sweep.parse_shard("2/4") == (2, 4)
  for bad in ["4/4", "1", "a/b", "-1/3", "0/0"]:
    with pytest.raises(reparam.ConfigError, match="--shard"):
      sweep.parse_shard(bad)


def test_trial_names_and_overrides():
  config = common.base("t")
  trials = sweep.expand(config, [{"reparam.transform": "chain(dora(rank=4), multipliers(row=True))",
                                  "optimizer.name": "muon", "seed": 1}])
  assert trials[0]["name"] == "transform=chain-dora-rank=4-multipliers-row=True,optimizer=muon,seed=1"
  assert trials[0]["config"].optimizer.name == "muon" and config.optimizer.name == "adamw"
  with pytest.raises(reparam.ConfigError, match=r"get_sweep\(\)\[0\]: cannot set optimzer.name"):
    sweep.expand(config, [{"optimzer.name": "muon"}])
  with pytest.raises(reparam.ConfigError, match="repeats trial"):
    sweep.expand(config, [{"seed": 0}, {"seed": 0}])


def test_seed_groups_keep_only_seeds_together():
  trials = [{"overrides": {"t": t, "seed": s}} for t in "ab" for s in (0, 1, 2)]
  groups = sweep.seed_groups(trials)
  assert [[g["overrides"]["seed"] for g in grp] for grp in groups] == [[0, 1, 2], [0, 1, 2]]
  assert {grp[0]["overrides"]["t"] for grp in groups} == {"a", "b"}
