"""The spot watcher (gram_ray/cluster/spot.py) against a local server on 127.0.0.1 that plays the instance
metadata (tests/metadata_server.py): no notice, an interruption notice, a rebalance recommendation, the service
unreachable, for AWS (IMDSv2) and GCP. The drain it makes of a real Ray node: tests/test_spot.py."""

import socket

import pytest
from metadata_server import MetadataServer

from gram_ray.cluster.spot import GCP_NOTICE_S, AwsMetadata, GcpMetadata, SpotWatcher


@pytest.fixture
def metadata():
    server = MetadataServer()
    yield server
    server.stop()


def _watcher(metadata_reader, **kwargs):
    drains, lines = [], []
    watcher = SpotWatcher(
        metadata_reader,
        lambda deadline_s, why: drains.append((deadline_s, why)),
        poll_s=0.01,
        log=lines.append,
        **kwargs,
    )
    return watcher, drains, lines


def test_aws_without_a_notice_polls_on_with_one_imdsv2_token_and_drains_nothing(metadata):
    watcher, drains, lines = _watcher(AwsMetadata(metadata.url))
    assert watcher.run(polls=5) is None
    assert drains == [] and lines == []
    puts = [r for r in metadata.requests if r[0] == "PUT"]
    assert len(puts) == 1 and puts[0][2]["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"  # IMDSv2: one session
    reads = [r for r in metadata.requests if r[0] == "GET"]
    assert len(reads) == 10 and all(r[2]["x-aws-ec2-metadata-token"] == "token-0" for r in reads)


def test_aws_an_interruption_notice_drains_the_node_with_its_real_deadline_and_ends_the_watch(metadata):
    watcher, drains, lines = _watcher(AwsMetadata(metadata.url))
    assert watcher.run(polls=2) is None
    metadata.interrupt_in(120)
    notice = watcher.run(polls=5)
    assert notice is not None and notice.kind == "interruption"
    ((deadline_s, why),) = drains
    assert 117 <= deadline_s <= 120  # the notice's time is to the second
    assert why.startswith("interruption: spot terminate at ")
    assert "draining this node, to go in 1" in lines[-1]


def test_aws_a_token_that_expired_is_renewed_once(metadata):
    watcher, drains, _ = _watcher(AwsMetadata(metadata.url))
    watcher.run(polls=1)
    metadata.expire_tokens()  # the service restarted, or the token's TTL ran out
    metadata.interrupt_in(60)
    assert watcher.run(polls=1).kind == "interruption" and len(drains) == 1
    assert len([r for r in metadata.requests if r[0] == "PUT"]) == 2


def test_aws_a_rebalance_recommendation_drains_with_its_own_deadline_once_and_the_watch_goes_on(metadata):
    watcher, drains, lines = _watcher(AwsMetadata(metadata.url), rebalance_deadline_s=120.0)
    metadata.rebalance = {"noticeTime": "2026-12-07T05:00:00Z"}
    assert watcher.run(polls=4) is None  # drained once, and still watching for the interruption
    assert drains == [(120.0, "rebalance: rebalance recommendation of 2026-12-07T05:00:00Z")]
    metadata.interrupt_in(90)  # the interruption that may follow: drained again with its real, earlier deadline
    assert watcher.run(polls=3).kind == "interruption"
    assert len(drains) == 2 and 87 <= drains[1][0] <= 90


def test_aws_a_rebalance_recommendation_is_only_said_with_no_deadline_of_its_own(metadata):
    watcher, drains, lines = _watcher(AwsMetadata(metadata.url), rebalance_deadline_s=None)
    metadata.rebalance = {"noticeTime": "2026-12-07T05:00:00Z"}
    assert watcher.run(polls=3) is None and drains == []
    assert lines == [
        "spot-watch: rebalance recommendation of 2026-12-07T05:00:00Z; not drained (--rebalance-deadline-s 0)"
    ]


def test_an_unreachable_service_is_said_once_and_waited_out_then_a_notice_is_drained(metadata):
    watcher, drains, lines = _watcher(AwsMetadata(metadata.url, timeout_s=1.0))
    metadata.down = True  # connections dropped unanswered
    assert watcher.run(polls=4) is None and drains == []
    assert len(lines) == 1 and lines[0].startswith("spot-watch: the instance metadata is unreachable (")
    metadata.down = False
    metadata.interrupt_in(120)
    assert watcher.run(polls=2).kind == "interruption"
    assert lines[1] == "spot-watch: the instance metadata answers again" and len(drains) == 1


def test_no_service_at_all_is_unreachable_not_an_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens on it once closed
    watcher, drains, lines = _watcher(AwsMetadata(f"http://127.0.0.1:{port}", timeout_s=1.0))
    assert watcher.run(polls=2) is None and drains == [] and len(lines) == 1 and "unreachable" in lines[0]


def test_gcp_preempted_drains_with_its_30_s_less_a_poll_and_only_with_the_metadata_flavor(metadata):
    reader = GcpMetadata(metadata.url, poll_s=2.0)
    watcher, drains, _ = _watcher(reader)
    assert watcher.run(polls=3) is None and drains == []
    metadata.preempted = True
    notice = watcher.run(polls=3)
    assert notice.kind == "preempted" and drains == [(GCP_NOTICE_S - 2.0, "preempted: instance/preempted is TRUE")]
    assert all(r[2].get("metadata-flavor") == "Google" for r in metadata.requests)
