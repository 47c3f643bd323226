"""A spot or preemptible node's notice, read from its cloud's instance metadata, turned into a drain of its own Ray
node with the real deadline (cluster/drain.py), so that training checkpoints before the node goes
(train/preemption.py). Nothing in Ray reads these notices; the cluster YAMLs start this watcher on every worker
node (`gram-ray cluster spot-watch`).

- AWS (IMDSv2: a session token, then reads with it): `spot/instance-action` appears two minutes before a spot
  instance is stopped or terminated, with the time it happens; `events/recommendations/rebalance` may come
  earlier, when the instance is at elevated risk, with no time. A rebalance recommendation is drained with a
  deadline of its own (`--rebalance-deadline-s`): the run checkpoints and moves to the nodes left and a
  replacement before any interruption, at the price of one restart when none would have come.
- GCP: `instance/preempted` turns TRUE about 30 s before the VM is stopped; the metadata gives no time, so the
  deadline is 30 s less one poll interval from when it is seen.

Stdlib HTTP only: the watcher starts on every node before anything else is installed there.
"""

from __future__ import annotations

import calendar
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "AWS_METADATA",
    "GCP_METADATA",
    "GCP_NOTICE_S",
    "AwsMetadata",
    "GcpMetadata",
    "MetadataUnreachable",
    "SpotNotice",
    "SpotWatcher",
]

AWS_METADATA = "http://169.254.169.254"
GCP_METADATA = "http://metadata.google.internal"
GCP_NOTICE_S = 30.0
TOKEN_TTL_S = 21600  # IMDSv2's longest session


@dataclass(frozen=True)
class SpotNotice:
    kind: str  # "interruption" (AWS), "rebalance" (AWS), "preempted" (GCP)
    deadline_s: float | None  # seconds from when it was read until the node goes; None: not said
    detail: str  # what the metadata said


class MetadataUnreachable(OSError):
    """The metadata service did not answer (not on that cloud, IMDS turned off, a hop limit too low)."""


def _request(url: str, headers: dict, method: str = "GET", timeout_s: float = 2.0) -> tuple[int, str]:
    """(status, body); 404 and the like are answers, a refused or timed-out connection is MetadataUnreachable."""
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        raise MetadataUnreachable(f"{url}: {getattr(e, 'reason', e)}") from e


def _iso_to_unix(text: str) -> float:
    """AWS's "2026-12-07T05:12:00Z"."""
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


class AwsMetadata:
    """EC2's instance metadata through IMDSv2: a PUT for a session token, then reads that carry it."""

    def __init__(self, base: str = AWS_METADATA, timeout_s: float = 2.0) -> None:
        self.base, self.timeout_s = base.rstrip("/"), timeout_s
        self._token: str | None = None

    def _refresh_token(self) -> None:
        status, body = _request(
            f"{self.base}/latest/api/token",
            {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)},
            method="PUT",
            timeout_s=self.timeout_s,
        )
        if status != 200:
            raise MetadataUnreachable(f"{self.base}/latest/api/token: HTTP {status} ({body[:200]})")
        self._token = body.strip()

    def _get(self, path: str) -> str | None:
        """The item's text, or None where it is absent (404)."""
        for _ in range(2):  # a token expired or from a restarted service (401): one fresh token
            if self._token is None:
                self._refresh_token()
            status, body = _request(
                f"{self.base}/latest/meta-data/{path}",
                {"X-aws-ec2-metadata-token": self._token},
                timeout_s=self.timeout_s,
            )
            if status == 401:
                self._token = None
                continue
            if status == 404:
                return None
            if status != 200:
                raise MetadataUnreachable(f"{self.base}/latest/meta-data/{path}: HTTP {status} ({body[:200]})")
            return body
        raise MetadataUnreachable(f"{self.base}: every token was refused (HTTP 401)")

    def notice(self, now: float | None = None) -> SpotNotice | None:
        now = time.time() if now is None else now
        action = self._get("spot/instance-action")
        if action is not None:
            item = json.loads(action)  # {"action": "terminate" | "stop" | "hibernate", "time": "...Z"}
            deadline = max(0.0, _iso_to_unix(item["time"]) - now)
            return SpotNotice("interruption", deadline, f"spot {item['action']} at {item['time']}")
        rebalance = self._get("events/recommendations/rebalance")
        if rebalance is not None:
            item = json.loads(rebalance)  # {"noticeTime": "...Z"}
            return SpotNotice("rebalance", None, f"rebalance recommendation of {item.get('noticeTime', '?')}")
        return None


class GcpMetadata:
    """Compute Engine's metadata server."""

    def __init__(self, base: str = GCP_METADATA, timeout_s: float = 2.0, poll_s: float = 2.0) -> None:
        self.base, self.timeout_s, self.poll_s = base.rstrip("/"), timeout_s, poll_s

    def notice(self, now: float | None = None) -> SpotNotice | None:
        url = f"{self.base}/computeMetadata/v1/instance/preempted"
        status, body = _request(url, {"Metadata-Flavor": "Google"}, timeout_s=self.timeout_s)
        if status != 200:
            raise MetadataUnreachable(f"{url}: HTTP {status} ({body[:200]})")
        if body.strip().upper() != "TRUE":
            return None
        # Seen up to one poll after it turned TRUE: count the deadline from then.
        return SpotNotice("preempted", max(0.0, GCP_NOTICE_S - self.poll_s), "instance/preempted is TRUE")


class SpotWatcher:
    """Polls `metadata.notice()` and drains this node on a notice: drain(deadline_s, why). An interruption (or
    GCP's preemption) is drained and ends the watch; a rebalance recommendation is drained with
    rebalance_deadline_s (None: only said) and the watch goes on, for the interruption that may follow."""

    def __init__(
        self,
        metadata,
        drain: Callable[[float | None, str], None],
        poll_s: float = 2.0,
        rebalance_deadline_s: float | None = 120.0,
        log: Callable[[str], None] = print,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.metadata, self.drain, self.poll_s = metadata, drain, poll_s
        self.rebalance_deadline_s, self.log, self.sleep = rebalance_deadline_s, log, sleep
        self.unreachable: str | None = None  # the outage being waited out, said once
        self.rebalanced = False

    def check(self) -> SpotNotice | None:
        """One poll: the notice acted on, or None."""
        try:
            notice = self.metadata.notice()
        except MetadataUnreachable as e:
            if self.unreachable is None:
                self.log(f"spot-watch: the instance metadata is unreachable ({e}); polling on")
            self.unreachable = str(e)
            return None
        if self.unreachable is not None:
            self.log("spot-watch: the instance metadata answers again")
            self.unreachable = None
        if notice is None:
            return None
        if notice.kind == "rebalance":
            if self.rebalanced:
                return None
            self.rebalanced = True
            if self.rebalance_deadline_s is None:
                self.log(f"spot-watch: {notice.detail}; not drained (--rebalance-deadline-s 0)")
                return None
            notice = SpotNotice(notice.kind, self.rebalance_deadline_s, notice.detail)
        when = f"in {notice.deadline_s:.0f} s" if notice.deadline_s is not None else "with no deadline"
        self.log(f"spot-watch: {notice.detail}: draining this node, to go {when}")
        self.drain(notice.deadline_s, f"{notice.kind}: {notice.detail}")
        return notice

    def run(self, polls: int | None = None) -> SpotNotice | None:
        """Poll until an interruption is drained (returned), or `polls` polls have been made (None: no limit)."""
        made = 0
        while polls is None or made < polls:
            notice = self.check()
            made += 1
            if notice is not None and notice.kind != "rebalance":
                return notice
            self.sleep(self.poll_s)
        return None
