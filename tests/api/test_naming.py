"""Names: safe path elements, versions, task queues."""

from datetime import UTC, datetime

import pytest

from api.errors import InvalidNameError
from api.naming import checkpoint_version, node_task_queue, require_path_element


@pytest.mark.parametrize("bad", ["", "..", "a/b", "a b", "x;rm"])
def test_unsafe_path_elements_are_refused(bad: str) -> None:
    with pytest.raises(InvalidNameError, match=r"\[A-Za-z0-9_.-\]\+"):
        require_path_element(bad, what="name")


def test_version_sorts_by_time() -> None:
    now = datetime(2026, 11, 24, 6, 1, 2, tzinfo=UTC)
    assert checkpoint_version(now, "abcdef0123") == "20261124T060102Z-abcdef"


def test_node_queue() -> None:
    assert node_task_queue("gpu-7") == "warmstart-node-gpu-7"
