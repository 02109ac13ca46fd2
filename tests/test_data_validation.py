"""InteractionTable ids: integers in [0, num_users) / [0, num_items), never silently truncated;
a bad id is reported with the source, the column, the row and the value."""

from __future__ import annotations

import numpy as np
import pytest

from metarec.data.errors import DataError
from metarec.data.table import InteractionTable


def _table(users, items=(0, 1, 2), num_users=3, num_items=3) -> InteractionTable:
    n = len(users)
    return InteractionTable(users=users, items=list(items)[:n], labels=np.full(n, 3.0),
                            timestamps=np.arange(n), num_users=num_users, num_items=num_items,
                            source="ratings.csv")


@pytest.mark.parametrize("users, message", [
    ([0, -1, 2], "ratings.csv, field 'users': id -1 at row 1 is negative"),
    ([0, 1, 3], "ratings.csv, field 'users': id 3 at row 2 is not below num_users = 3"),
    ([0, 1.5, 2], "ratings.csv, field 'users': id 1.5 at row 1 is not an integer"),
    (np.array([0.0, np.nan, 1.0]), "field 'users': id nan at row 1 is not an integer"),
    (["0", "a", "1"], "field 'users': id 'a' at row 1 is not an integer"),
    (np.array([False, True, True]), "field 'users': id False at row 0 is not an integer"),
])
def test_bad_user_ids_are_rejected_with_row_and_value(users, message):
    with pytest.raises(DataError, match="ids must") as err:
        _table(users)
    assert message in str(err.value)


def test_bad_item_ids_name_the_item_column():
    with pytest.raises(DataError, match=r"field 'items': id 7 at row 0 is not below "
                                        r"num_items = 3 \(2 such row\(s\)\)"):
        _table([0, 1, 2], items=[7, 1, 9])


def test_integral_values_of_any_dtype_are_accepted_as_int64():
    for users in ([0, 1, 2], np.array([0, 1, 2], dtype=np.uint8), [0.0, 1.0, 2.0], ["0", "1", "2"]):
        table = _table(users)
        assert table.users.dtype == np.int64 and table.users.tolist() == [0, 1, 2]
    assert len(_table([])) == 0
