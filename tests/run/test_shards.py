"""ddpm.run.shards: the shard folder of a sampling request, its settings check and the assembly."""
import json

import h5py
import numpy as np
import pytest

from ddpm.errors import UserError
from ddpm.run.shards import GROUP, ShardStore, differences, finished_settings

SETTINGS = {"num": 7, "batch": 3, "seed": 0, "guidance": 3.0}


def test_shards_cover_the_indices_once_and_assemble_in_order(tmp_path):
    store = ShardStore(tmp_path / "x.shards", n=7, size=3)
    assert store.count == 3 and [list(store.indices(k)) for k in range(3)] == [[0, 1, 2], [3, 4, 5], [6]]
    store.begin(SETTINGS)
    for k in (2, 0, 1):  # any order, as ranks finish
        idx = np.array(store.indices(k))
        store.commit(k, np.full((len(idx), 4, 4, 1), k, np.uint8), idx % 10)
        assert store.done(k)
    out = tmp_path / "x.h5"
    attrs = {"num": 7, "settings": json.dumps(SETTINGS, sort_keys=True)}
    assert store.assemble(out, attrs) == 7 and not store.folder.exists()
    with h5py.File(out, "r") as f:
        assert f[GROUP]["images"][:, 0, 0, 0].tolist() == [0, 0, 0, 1, 1, 1, 2]
        assert f[GROUP]["labels"][()].tolist() == list(range(7))
    assert finished_settings(out) == SETTINGS


def test_settings_that_differ_are_named(tmp_path):
    assert differences(SETTINGS, {**SETTINGS, "seed": 1, "extra": 2}) == ["extra", "seed"]
    store = ShardStore(tmp_path / "y.shards", n=7, size=3)
    store.begin(SETTINGS)
    store.check(SETTINGS, "fix")  # the same request: fine
    with pytest.raises(UserError, match=r"other settings \(differs in seed\); fix"):
        store.check({**SETTINGS, "seed": 5}, "fix")


def test_a_file_that_is_not_a_finished_request_is_named(tmp_path):
    (tmp_path / "z.h5").write_text("not hdf5")
    with pytest.raises(UserError, match="is not a finished sample request"):
        finished_settings(tmp_path / "z.h5")
    assert finished_settings(tmp_path / "none.h5") is None
