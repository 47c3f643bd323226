"""`gram-ray bench preprocess`: decoding a large collection into the cache, and what it costs a decode worker.

Generates a collection of synthetic clips (the demo's kind: H.264 video with an audio track beside it, each clip
its own files), then runs gram-ray's own preprocessing (data/preprocess.py: Ray Data tasks, one shard of clips
each, written straight to the cache) on it, each run on a fresh Ray:
  - 1 decode worker on a tenth of the clips, then on all of them: the worker's peak memory should not grow with
    the number of clips (a worker holds one shard at a time; nothing accumulates);
  - 2 decode workers on all of them: the speed-up;
  - a 2-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head that decodes nothing and two nodes of
    one CPU each): the same decode spread over nodes, as on a cluster.
Memory is each decode worker process's peak resident set (the kernel's VmHWM, read from /proc while it runs: a
Ray worker is a process of its own, and a fresh Ray per run means no worker carries an earlier run's peak).

With --source files and/or webdataset (bench_sources): the same clips in a bucket of a local S3 server (moto, on
127.0.0.1), as one object per video and audio file next to the annotation file, and as video2dataset-style tar
shards; each preprocessed from the bucket into a local cache, counting the requests the server answered about the
inputs (it logs every request).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gram_ray.bench.common import process_memory
from gram_ray.config import DataConfig

__all__ = [
    "DECODE_TASK",
    "SOURCES",
    "bench_sources",
    "sources_table",
    "ProcessWatch",
    "generate_collection",
    "bench_preprocess",
    "preprocess_table",
]

DECODE_TASK = "write_shards"  # the cache writer's UDF: Ray names a worker process after the task it runs
SOURCES = ("files", "webdataset")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


class ProcessWatch:
    """Samples, every interval_s, the processes of this machine that run a task named `task` (Ray's process
    title), and this process: their peak resident sets, and which parent (a node's raylet) each worker hangs
    from. Linux only (/proc)."""

    def __init__(self, task: str = DECODE_TASK, interval_s: float = 0.5) -> None:
        self.task, self.interval_s = task, interval_s
        self.workers: dict[int, dict] = {}  # pid -> {"peak": bytes, "parent": pid}
        self.driver_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        self.driver_peak = max(self.driver_peak, process_memory(os.getpid()).get("VmRSS", 0))
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            if pid not in self.workers and self.task not in _cmdline(pid):
                continue
            status = process_memory(pid)
            if not status:
                continue
            entry = self.workers.setdefault(pid, {"peak": 0, "parent": _parent(pid)})
            entry["peak"] = max(entry["peak"], status["VmHWM"])

    def summary(self) -> dict:
        peaks = [w["peak"] for w in self.workers.values()]
        return {
            "decode_workers": len(peaks),
            "worker_peak_rss_mb": [round(p / 2**20) for p in sorted(peaks)],
            "max_worker_peak_rss_mb": round(max(peaks, default=0) / 2**20),
            "driver_peak_rss_mb": round(self.driver_peak / 2**20),
            "nodes_used": len({w["parent"] for w in self.workers.values()}),
        }


def generate_collection(out: Path, clips: int, progress: Callable[[str], None] = print) -> dict:
    """clips synthetic clips under out (gram_ray.data.synthetic, reused when already there); their paths."""
    from gram_ray.data.synthetic import dataset_paths, generate

    paths = dataset_paths(out)
    videos = Path(paths["videos"])
    if Path(paths["all"]).is_file() and videos.is_dir() and len(list(videos.iterdir())) == clips:
        progress(f"  reusing the {clips} clips under {out}")
        return paths
    start, step = time.perf_counter(), max(1, clips // 10)

    def report(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            progress(f"  generated {done}/{total} clips ({time.perf_counter() - start:.0f} s)")

    return generate(out, n=clips, seed=0, progress=report)


def _annotations_subset(paths: dict, clips: int, out: Path) -> str:
    import json

    entries = json.loads(Path(paths["all"]).read_text())[:clips]
    out.write_text(json.dumps(entries))
    return str(out)


def _local_ray() -> Callable[[], None]:
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray.shutdown


def _two_node_ray() -> Callable[[], None]:
    """A head with no CPUs and two nodes of one CPU each, on 127.0.0.1; connects this process to it."""
    import ray
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    for _ in range(2):
        cluster.add_node(node_ip_address="127.0.0.1", num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    record = Path(get_ray_address_file(None))

    def stop() -> None:
        ray.shutdown()
        cluster.shutdown()
        if record.is_file() and record.read_text().strip() == cluster.address:
            record.unlink()  # Cluster records itself as the machine's current cluster: take that back

    return stop


def _run(name: str, start_ray, annotations: str, paths: dict, data: DataConfig, out: Path, progress) -> dict:
    """One preprocessing run on a Ray of its own (start_ray), each decode worker watched. paths: where the media
    are ("videos", "audios"; None for a source whose media are in its shards)."""
    from gram_ray.data.preprocess import preprocess

    stop = start_ray()
    try:
        with ProcessWatch() as watch:
            report = preprocess(
                annotations, paths["videos"], out, data, audio_dir=paths["audios"], mode="train", force=True,
                log=lambda line: progress(f"    {line}"),
            )  # fmt: skip
    finally:
        stop()
    result = {
        "run": name,
        "clips": report["rows_total"],
        "written": report["rows_written"],
        "seconds": report["wall_seconds"],
        "clips_per_s": report["clips_per_second"],
        "decode_concurrency": data.decode_concurrency,
    } | watch.summary()
    progress(
        f"  {name}: {result['clips_per_s']:.1f} clips/s, {result['decode_workers']} decode worker(s) on "
        f"{result['nodes_used']} node(s), peak {result['max_worker_peak_rss_mb']} MB a worker"
    )
    return result


def bench_preprocess(
    data: DataConfig, clips: int, work: Path, *, cluster: bool = True, progress: Callable[[str], None] = print
) -> dict:
    """The runs described in the module's docstring; needs no Ray running in this process (each run starts its
    own)."""
    import logging

    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # each run's own progress lines say enough
    if ray.is_initialized():
        raise RuntimeError("bench preprocess starts a Ray of its own for each run: call it without one running")
    if clips < 10:
        raise ValueError(f"bench preprocess needs at least 10 clips, got {clips}")
    progress(f"generating {clips} synthetic clips under {work / 'clips'} ...")
    paths = generate_collection(work / "clips", clips, progress)
    media_bytes = sum(f.stat().st_size for d in ("videos", "audios") for f in Path(paths[d]).iterdir())
    tenth = _annotations_subset(paths, clips // 10, work / "tenth.json")
    runs = []
    for name, subset, workers, start in (
        (f"1 worker, {clips // 10} clips", tenth, 1, _local_ray),
        (f"1 worker, {clips} clips", paths["all"], 1, _local_ray),
        (f"2 workers, {clips} clips", paths["all"], 2, _local_ray),
        *([(f"2 nodes x 1 CPU, {clips} clips", paths["all"], None, _two_node_ray)] if cluster else []),
    ):
        progress(f"preprocessing: {name} ...")
        d = data.model_copy(deep=True)
        d.decode_concurrency = workers
        with tempfile.TemporaryDirectory(dir=work, prefix="cache-") as out:
            runs.append(_run(name, start, subset, paths, d, Path(out), progress))
    one, two = runs[1], runs[2]
    return {
        "clips": clips,
        "media_bytes_per_clip": media_bytes / clips,
        "cpu_cores": os.cpu_count(),
        "runs": runs,
        "speedup_2_workers": two["clips_per_s"] / one["clips_per_s"],
        "worker_peak_growth_10x_clips": one["max_worker_peak_rss_mb"] / max(runs[0]["max_worker_peak_rss_mb"], 1),
    }


def preprocess_table(result: dict) -> str:
    lines = [
        f"bench preprocess on {result['hardware']} ({result['cpu_cores']} cores): {result['clips']} clips, "
        f"{result['media_bytes_per_clip'] / 1e3:.1f} KB of media a clip",
        f"{'run':<32} {'clips/s':>8} {'seconds':>8} {'workers':>8} {'nodes':>6} {'peak MB/worker':>15} "
        f"{'driver MB':>10}",
    ]
    for r in result["runs"]:
        lines.append(
            f"{r['run']:<32} {r['clips_per_s']:>8.1f} {r['seconds']:>8.1f} {r['decode_workers']:>8} "
            f"{r['nodes_used']:>6} {r['max_worker_peak_rss_mb']:>15} {r['driver_peak_rss_mb']:>10}"
        )
    lines.append(
        f"2 workers: {result['speedup_2_workers']:.2f}x 1 worker; a worker's peak at 10x the clips: "
        f"{result['worker_peak_growth_10x_clips']:.2f}x"
    )
    return "\n".join(lines)


def _write_tars(paths: dict, bucket: str, clips_per_shard: int, progress) -> str:
    """The collection as video2dataset-style tar shards in the bucket ({key}.mp4, .wav, .txt, .json); the brace
    pattern that names them."""
    import io
    import json
    import tarfile

    from gram_ray import storage

    entries = json.loads(Path(paths["all"]).read_text())
    shards = (len(entries) + clips_per_shard - 1) // clips_per_shard
    for n in range(shards):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for entry in entries[n * clips_per_shard : (n + 1) * clips_per_shard]:
                clip = entry["video_id"]
                caption = entry.get("desc") or entry.get("caption")
                meta = {"videoid": clip, "caption": caption, "status": "success"}
                for suffix, blob in (
                    ("mp4", (Path(paths["videos"]) / f"{clip}.mp4").read_bytes()),
                    ("wav", (Path(paths["audios"]) / f"{clip}.wav").read_bytes()),
                    ("txt", str(caption).encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{clip}.{suffix}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
        storage.write_bytes_with(f"{bucket}/wds/{n:05d}.tar", lambda f, b=buffer: f.write(b.getvalue()))
        if (n + 1) % max(1, shards // 5) == 0 or n + 1 == shards:
            progress(f"  wrote {n + 1}/{shards} tar shards")
    return f"{bucket}/wds/{{{0:05d}..{shards - 1:05d}}}.tar"


def bench_sources(
    data: DataConfig,
    clips: int,
    work: Path,
    sources: tuple[str, ...] = SOURCES,
    clips_per_shard: int = 100,
    progress: Callable[[str], None] = print,
) -> dict:
    """The same clips in a local S3 bucket as files and as tar shards, each preprocessed from there: clips/s,
    requests a clip, each decode worker's peak memory. Starts the server and a Ray of its own for each run."""
    import logging

    import ray

    from gram_ray import storage
    from gram_ray.bench.local_s3 import LocalS3, point_s3_at
    from gram_ray.cluster.processes import free_port

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        raise RuntimeError("bench preprocess starts a Ray of its own for each run: call it without one running")
    progress(f"generating {clips} synthetic clips under {work / 'clips'} ...")
    paths = generate_collection(work / "clips", clips, progress)
    port = free_port()
    point_s3_at(port)  # before Ray starts: its workers inherit the endpoint
    server = LocalS3(port, work / "s3.log")
    runs = []
    try:
        bucket = server.bucket("bench")
        inputs = {}
        if "files" in sources:
            progress("uploading the clips as files (one object a video and an audio) ...")
            for part in ("videos", "audios"):
                storage.upload_dir(paths[part], f"{bucket}/files/{part}")
            storage.write_text(f"{bucket}/files/all.json", Path(paths["all"]).read_text())
            inputs["files"] = (f"{bucket}/files/all.json", f"{bucket}/files/videos", f"{bucket}/files/audios")
        if "webdataset" in sources:
            progress(f"writing the clips as tar shards of {clips_per_shard} ...")
            inputs["webdataset"] = (_write_tars(paths, bucket, clips_per_shard, progress), None, None)
        for source in sources:
            spec, videos, audios = inputs[source]
            d = data.model_copy(deep=True)
            d.source.kind = "manifest" if source == "files" else "webdataset"
            if source == "webdataset":
                d.source.fields.id = "videoid"
            prefix = f"{bucket}/{'files' if source == 'files' else 'wds'}"
            before = server.requests(prefix)
            progress(f"preprocessing from {source} in the bucket ...")
            with tempfile.TemporaryDirectory(dir=work, prefix="cache-") as out:
                result = _run(source, _local_ray, spec, {"videos": videos, "audios": audios}, d, Path(out), progress)
            asked = server.requests(prefix) - before
            result |= {
                "source": result.pop("run"),
                "requests": dict(asked),
                "requests_per_clip": sum(asked.values()) / max(result["clips"], 1),
            }
            progress(f"  {source}: {result['requests_per_clip']:.3f} requests a clip")
            runs.append(result)
    finally:
        server.stop()
    return {"clips": clips, "clips_per_shard": clips_per_shard, "cpu_cores": os.cpu_count(), "runs": runs}


def sources_table(result: dict) -> str:
    lines = [
        f"bench preprocess --source on {result['hardware']} ({result['cpu_cores']} cores): {result['clips']} clips "
        f"in a local S3 bucket (moto on 127.0.0.1), tar shards of {result['clips_per_shard']}",
        f"{'source':<12} {'clips/s':>8} {'seconds':>8} {'requests':>9} {'req/clip':>9} {'workers':>8} "
        f"{'peak MB/worker':>15}",
    ]
    for r in result["runs"]:
        lines.append(
            f"{r['source']:<12} {r['clips_per_s']:>8.1f} {r['seconds']:>8.1f} {sum(r['requests'].values()):>9} "
            f"{r['requests_per_clip']:>9.3f} {r['decode_workers']:>8} {r['max_worker_peak_rss_mb']:>15}"
        )
    by = {r["source"]: r for r in result["runs"]}
    if set(by) == set(SOURCES):
        ratio = by["files"]["requests_per_clip"] / max(by["webdataset"]["requests_per_clip"], 1e-9)
        speed = by["webdataset"]["clips_per_s"] / by["files"]["clips_per_s"]
        lines.append(f"shards: {ratio:.0f}x fewer requests a clip than files, {speed:.2f}x the clips/s")
    return "\n".join(lines)
