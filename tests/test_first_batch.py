"""A restarted group's first batch comes while its model is built (train/worker.py started_early): the rest of
an interrupted epoch starts its pipeline cold, and waiting for it only after the model is built added its whole
start to the restart. The restart on several nodes: tests/test_silent_loss.py."""

import threading

import pytest

from gram_ray.train.worker import started_early


def test_the_first_item_is_fetched_before_it_is_asked_for_and_every_item_comes_in_order():
    produced = threading.Event()

    def items():
        yield 1
        produced.set()  # reached only when something asked for a second item
        yield 2
        yield 3

    fetched = threading.Event()

    def make():
        def counted():
            for i in items():
                fetched.set()
                yield i

        return counted()

    batches = started_early(make)
    assert fetched.wait(timeout=10)  # the first came with no one asking
    assert not produced.is_set()  # and no more than the first
    assert list(batches) == [1, 2, 3]


def test_a_failure_to_start_is_raised_where_the_items_are_taken():
    def make():
        raise OSError("the cache is gone")

    batches = started_early(make)  # nothing raised here: the caller goes on building its model
    with pytest.raises(OSError, match="the cache is gone"):
        next(batches)


def test_a_failure_fetching_the_first_item_is_raised_where_the_items_are_taken():
    def make():
        def failing():
            raise ValueError("a bad block")
            yield  # a generator: it fails at its first item, not when made

        return failing()

    batches = started_early(make)
    with pytest.raises(ValueError, match="a bad block"):
        list(batches)


def test_no_items_is_no_items():
    assert list(started_early(lambda: iter(()))) == []
