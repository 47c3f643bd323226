"""`gram-ray bench scale`: gram-ray's own bookkeeping at a user's size (1 M, 4 M, 27 M clips), by simulation.

THE DECODE IS A STAND-IN. Each clip's "decode" writes a tiny synthetic row (one 8x8 frame, no audio) in place of
decoding video, so that 27 M clips fit this machine; the pieces keep the real recipe's size
(configs/vast27m-rows.yaml: its clips a piece, data.shard_mb scaled to the stand-in row). It measures the
bookkeeping around decoding, not decoding.

For each size: a JSONL manifest of VAST-27M's row shape (an id, a video path, a span, a caption), then each phase in
a process of its own, whose peak resident set is the driver's peak memory for that phase:
  plan        the planner alone: scan and cut the manifest (data/manifest_stream.py), no Ray;
  preprocess  `preprocess` on a Ray of this machine, SIGKILLed once a third of its pieces are recorded; the time
              to its first piece recorded;
  resume      the same again: the time to its first new piece and to the end; every piece written once (the
              pieces recorded before the kill untouched, one file and one record a piece);
  listing     the cache's files listed (storage.list_files);
  read        Ray Data's read of the cache as training opens it (read_cache with files), to the first batch;
  checkpoint  a mid-epoch checkpoint's data state (data/epoch_progress.py) over the cache's files: half of
              them trained on whole, 16 in progress (8 workers reading 2 each);
  index       an index's bookkeeping of the clips it holds (retrieval/index.py's id set) over the cache's files.
With s3_clips: a run of that size writes its cache to a bucket of the local S3 server (moto) and counts the
requests it answered, a clip.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gram_ray.bench.common import process_memory

__all__ = ["ScaleResult", "bench_scale", "scale_table", "stand_in_decode", "write_manifest", "stand_in_data"]

STAND_IN = "stand-in decode: a tiny synthetic row a clip, no video (bookkeeping only)"
_CONFIG = "configs/vast27m-rows.yaml"
_CONFIG_PATH = Path(__file__).resolve().parent.parent.parent / _CONFIG


def stand_in_decode(clip, data, mode, rng) -> dict:
    """The stand-in for decoding a clip's video: one 8x8 frame of zeros."""
    v = data.video
    return {"frames": np.zeros((v.num_frames, 3, v.size, v.size), np.uint8)}


def stand_in_data(config: str | Path = _CONFIG_PATH):
    """The recipe's data settings with the stand-in's row (1 frame of 8x8, no audio, raw) and the recipe's clips a
    piece: data.shard_mb scaled so that rows_per_shard is what the real recipe's training cache holds."""
    from gram_ray.config import load_config
    from gram_ray.data.preprocess import rows_per_shard

    data = load_config(config, []).data
    real = rows_per_shard(data, "train")
    data.video.num_frames, data.video.size, data.video.cache_codec = 1, 8, "raw"
    data.video.train_draws, data.audio.format = 1, "none"
    data.shard_mb = real * 1024 / 2**20  # a stand-in row counts as 1 KB (rows_per_shard's floor)
    data.source.fields = data.source.fields.model_copy(update={"video": "video", "start": "start", "end": "end"})
    return data, real


def write_manifest(path: Path, clips: int, log=print) -> None:
    """clips JSONL rows of VAST-27M's shape, each its own video's 10 s span. Written once, kept for later runs."""
    if path.is_file() and path.with_suffix(".done").is_file():
        return
    started, block = time.perf_counter(), 200_000
    with path.open("w") as f:
        for start in range(0, clips, block):
            f.write(
                "".join(
                    f'{{"clip_id": "c{i:08d}", "video": "/data/vast27m/videos/v{i:08d}.mp4", "start": 12.5, '
                    f'"end": 22.5, "vast_cap": "a person walks a dog along a beach at sunset, number {i}"}}\n'
                    for i in range(start, min(clips, start + block))
                )
            )
    path.with_suffix(".done").write_text(str(clips))
    log(
        f"  wrote {clips:,} manifest rows ({path.stat().st_size / 2**30:.2f} GiB) in "
        f"{time.perf_counter() - started:.0f} s"
    )


# ---- the phases, each run in a process of its own (`python -m gram_ray.bench.scale PHASE ARGS`) ----------------


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _phase_plan(args: dict) -> dict:
    from gram_ray.data.manifest_stream import cut_pieces, scan_manifest
    from gram_ray.data.preprocess import rows_per_shard

    data, _ = stand_in_data()
    started = time.perf_counter()
    scan = scan_manifest(args["manifest"])
    pieces = cut_pieces(scan, data.source.fields, rows_per_shard(data, "eval"))
    return {"entries": scan.entries, "pieces": len(pieces), "seconds": time.perf_counter() - started}


def _connect(address: str) -> None:
    """Join the bench's Ray as `gram-ray preprocess` joins a cluster (cli/common.py's init_ray with RAY_ADDRESS):
    the variables that say where storage is go to its workers."""
    import ray

    from gram_ray import storage

    forwarded = storage.forwarded_env()
    runtime_env = {"env_vars": forwarded} if forwarded else None
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, configure_logging=False)


def _phase_preprocess(args: dict) -> dict:
    from gram_ray.data.preprocess import preprocess

    _connect(args["address"])
    data, _ = stand_in_data()
    started = time.perf_counter()
    report = preprocess(
        args["manifest"], None, args["out"], data, mode="eval", log=lambda line: print(line, flush=True),
        decoder=stand_in_decode,
    )  # fmt: skip
    return {
        "seconds": time.perf_counter() - started,
        "clips": report["rows_written"],
        "pieces": report["shards"],
        "reused": report["shards_reused"],
    }


def _phase_read(args: dict) -> dict:
    from gram_ray import storage
    from gram_ray.data.parquet_layout import read_cache

    _connect(args["address"])
    started = time.perf_counter()
    ds = read_cache(storage.join(args["out"], "shards"), with_files=True, block_per_file=True)
    first = next(iter(ds.iter_batches(batch_size=64, batch_format="pyarrow")))
    return {"seconds": time.perf_counter() - started, "first_batch_rows": first.num_rows}


def _phase_index(args: dict) -> dict:
    from gram_ray import storage
    from gram_ray.retrieval.index import _ids

    started = time.perf_counter()
    ids = _ids(storage.list_files(storage.join(args["out"], "shards"), ".parquet"))
    return {"seconds": time.perf_counter() - started, "ids": len(ids), "id_bytes": ids.nbytes}


_PHASES = {"plan": _phase_plan, "preprocess": _phase_preprocess, "read": _phase_read, "index": _phase_index}


def _main(argv: list[str]) -> None:
    phase, args = argv[0], json.loads(argv[1])
    result = _PHASES[phase](args)
    print("RESULT " + json.dumps(result | {"peak_mb": round(_peak_mb(), 1)}), flush=True)


class _Phase:
    """One phase's process: started, watched (its peak memory, read from /proc), killed or waited for."""

    def __init__(self, phase: str, args: dict, log_path: Path) -> None:
        self.started = time.perf_counter()
        self.log_path = log_path
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gram_ray.bench.scale", phase, json.dumps(args)],
            stdout=log_path.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def peak_mb(self) -> float:
        return process_memory(self.process.pid).get("VmHWM", 0) / 2**20

    def kill(self) -> float:
        """SIGKILL, as a lost head would be; returns its peak memory so far."""
        peak = self.peak_mb()
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        return peak

    def result(self, timeout: float) -> dict:
        self.process.wait(timeout=timeout)
        text = self.log_path.read_text()
        line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("RESULT ")), None)
        if self.process.returncode != 0 or line is None:
            raise RuntimeError(f"the bench's phase failed (exit {self.process.returncode}): {text[-3000:]}")
        return json.loads(line.removeprefix("RESULT "))


def _records(out: Path) -> dict[str, int]:
    """{piece name: its record's mtime_ns}: the pieces recorded so far."""
    done = out / "_done"
    if not done.is_dir():
        return {}
    out = {}
    with os.scandir(done) as entries:
        for e in entries:
            if e.name.startswith("shard-") and e.name.endswith(".json"):  # not a record being written
                try:
                    out[e.name] = e.stat().st_mtime_ns
                except FileNotFoundError:
                    continue
    return out


@dataclass
class ScaleResult:
    clips: int
    storage: str  # local disk, or the local S3 server
    clips_a_piece: int
    phases: dict = field(default_factory=dict)  # phase -> {"seconds", "peak_mb", ...}
    first_piece_s: float | None = None  # from the preprocess command's start to its first piece recorded
    resume_first_piece_s: float | None = None
    pieces: int = 0
    written_once: bool | None = None
    objects_written: int = 0
    listed: int = 0
    requests_per_clip: float | None = None
    checkpoint_state_bytes: int = 0


def _checkpoint_state(report: dict) -> int:
    """A mid-epoch checkpoint's data state over the cache's files: half of them done, 16 in progress."""
    from gram_ray.data.epoch_progress import EpochProgress

    file_rows = report["file_rows"]
    names = sorted(file_rows)
    progress = EpochProgress(file_rows)
    progress.done = set(names[::2])  # as add() leaves it once every row of those files was trained on
    for name in names[1:33:2]:
        progress.add([name] * (file_rows[name] // 2), [f"{name}#{r}" for r in range(file_rows[name] // 2)])
    return len(json.dumps(progress.to_json()))


def _run_local(clips: int, work: Path, ray_address: str, log) -> ScaleResult:
    from gram_ray import storage

    data, real = stand_in_data()
    size_dir = work / f"{clips}"
    size_dir.mkdir(parents=True, exist_ok=True)
    manifest = size_dir / "manifest.jsonl"
    write_manifest(manifest, clips, log)
    result = ScaleResult(clips, "local disk", real)

    plan = _Phase("plan", {"manifest": str(manifest)}, size_dir / "plan.log").result(timeout=3600)
    result.phases["plan"] = plan
    log(f"  plan: {plan['pieces']:,} pieces in {plan['seconds']:.1f} s, driver peak {plan['peak_mb']:.0f} MB")

    out = size_dir / "cache"
    storage.delete_dir(str(out))
    args = {"manifest": str(manifest), "out": str(out), "address": ray_address}
    first = _Phase("preprocess", args, size_dir / "preprocess.log")
    pieces = plan["pieces"]
    while len(records := _records(out)) < max(1, pieces // 3):
        if result.first_piece_s is None and records:
            result.first_piece_s = time.perf_counter() - first.started
        if first.process.poll() is not None:
            raise RuntimeError(
                f"preprocess ended before it was killed: {(size_dir / 'preprocess.log').read_text()[-3000:]}"
            )
        time.sleep(0.5)
    result.first_piece_s = result.first_piece_s or time.perf_counter() - first.started
    killed_peak = first.kill()
    before = _records(out)
    result.phases["preprocess"] = {"seconds": time.perf_counter() - first.started, "peak_mb": round(killed_peak, 1),
                                   "pieces_before_kill": len(before)}  # fmt: skip
    log(f"  preprocess: first piece at {result.first_piece_s:.1f} s; killed with {len(before):,} of {pieces:,} "
        f"pieces recorded, driver peak {killed_peak:.0f} MB")  # fmt: skip

    resume = _Phase("preprocess", args, size_dir / "resume.log")
    while True:
        now = _records(out)
        if any(name not in before for name in now) or resume.process.poll() is not None:
            result.resume_first_piece_s = time.perf_counter() - resume.started
            break
        time.sleep(0.2)
    done = resume.result(timeout=7200)
    result.phases["resume"] = done
    after = _records(out)
    files = [p.name for p in (out / "shards").iterdir()]
    result.pieces = len(after)
    result.written_once = (
        all(after[name] == mtime for name, mtime in before.items())  # not rewritten by the resumed run
        and len(after) == pieces == len(files) == done["pieces"]  # one record and one file a piece
        and done["reused"] == len(before)
    )
    result.objects_written = len(after) + len(files) + 2  # records, shards, the plan and the report
    log(f"  resume: first new piece at {result.resume_first_piece_s:.1f} s, done in {done['seconds']:.1f} s, "
        f"driver peak {done['peak_mb']:.0f} MB; every piece written once: {result.written_once}")  # fmt: skip

    started = time.perf_counter()
    listed = storage.list_files(str(out / "shards"), ".parquet")
    result.listed = len(listed)
    result.phases["listing"] = {"seconds": time.perf_counter() - started, "files": len(listed)}

    read = _Phase("read", args, size_dir / "read.log").result(timeout=3600)
    result.phases["read"] = read
    log(f"  read planning to the first batch: {read['seconds']:.1f} s, driver peak {read['peak_mb']:.0f} MB")

    report = json.loads((out / "report.json").read_text())
    result.checkpoint_state_bytes = _checkpoint_state(report)
    index = _Phase("index", args, size_dir / "index.log").result(timeout=7200)
    result.phases["index"] = index
    log(f"  checkpoint data state {result.checkpoint_state_bytes:,} bytes; index ids of {index['ids']:,} clips in "
        f"{index['seconds']:.1f} s, peak {index['peak_mb']:.0f} MB")  # fmt: skip
    return result


def _run_s3(clips: int, work: Path, ray_address: str, server, log) -> ScaleResult:
    """The same preprocess, its cache written to a bucket of the local S3 server (the manifest read from there too):
    the requests the server answered, a clip."""
    from gram_ray import storage

    data, real = stand_in_data()
    manifest = work / f"{clips}" / "manifest.jsonl"
    write_manifest(manifest, clips, log)
    bucket = server.bucket()
    remote = f"{bucket}/in/manifest.jsonl"
    fs, path = storage.resolve(remote)
    with manifest.open("rb") as src, fs.open_output_stream(path) as dst:
        while chunk := src.read(64 * 2**20):
            dst.write(chunk)
    out = f"{bucket}/cache"
    before = server.requests(bucket)
    args = {"manifest": remote, "out": out, "address": ray_address}
    done = _Phase("preprocess", args, work / f"{clips}" / "s3.log").result(timeout=7200)
    asked = server.requests(bucket) - before
    result = ScaleResult(clips, "local S3 server", real, {"preprocess": done}, pieces=done["pieces"])
    result.requests_per_clip = round(sum(asked.values()) / max(clips, 1), 4)
    result.phases["preprocess"]["requests"] = dict(asked)
    log(f"  S3: {done['pieces']:,} pieces in {done['seconds']:.1f} s, {dict(asked)}: "
        f"{result.requests_per_clip} requests a clip")  # fmt: skip
    return result


def _cluster():
    """A Ray head on 127.0.0.1 with more logical CPUs than cores (as gram-ray's local Ray), for the phases to join
    and outlive: a killed driver's tasks end with it, the head stays. Returns (address, stop)."""
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 8, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    record = Path(get_ray_address_file(None))

    def stop() -> None:
        cluster.shutdown()
        if record.is_file() and record.read_text().strip() == cluster.address:
            record.unlink()  # Cluster records itself as the machine's current cluster: take that back

    return cluster.address, stop


def bench_scale(
    sizes: tuple[int, ...] = (1_000_000, 4_000_000, 27_000_000),
    work: Path = Path("bench-scale"),
    s3_clips: int | None = 1_000_000,
    log=print,
) -> list[ScaleResult]:
    """Each size on local disk (kill and resume included), then s3_clips through the local S3 server."""
    work = Path(work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    log(f"gram-ray bench scale: {STAND_IN}")
    results = []
    address, stop = _cluster()
    try:
        for clips in sizes:
            log(f"{clips:,} clips, local disk:")
            results.append(_run_local(clips, work, address, log))
    finally:
        stop()
    if s3_clips:
        from gram_ray.bench.local_s3 import LocalS3, point_s3_at
        from gram_ray.cluster.processes import free_port

        port = free_port()
        server = LocalS3(port, work / "s3.log")
        point_s3_at(port)  # before the Ray below starts, so its workers inherit it
        address, stop = _cluster()
        try:
            log(f"{s3_clips:,} clips, local S3 server:")
            results.append(_run_s3(s3_clips, work, address, server, log))
        finally:
            stop()
            server.stop()
    return results


def scale_table(results: list[ScaleResult], hardware: str) -> str:
    lines = [
        f"gram-ray bench scale on {hardware}; {STAND_IN}; {results[0].clips_a_piece} clips a piece "
        f"({_CONFIG}'s training cache)",
        f"{'clips':>11} {'storage':<16} {'pieces':>8} {'plan s':>7} {'plan MB':>8} {'1st piece s':>11} "
        f"{'preproc MB':>10} {'resume s':>9} {'resume MB':>9} {'once':>5} {'read s':>7} {'read MB':>8} "
        f"{'ckpt B':>7} {'index MB':>8} {'req/clip':>8}",
    ]
    for r in results:
        p = r.phases

        def cell(phase, key, fmt="{:.0f}", width=8, p=p):
            value = p.get(phase, {}).get(key)
            return (fmt.format(value) if value is not None else "-").rjust(width)

        once = "-" if r.written_once is None else "yes" if r.written_once else "NO"
        lines.append(
            f"{r.clips:>11,} {r.storage:<16} {r.pieces:>8,} {cell('plan', 'seconds', '{:.1f}', 7)} "
            f"{cell('plan', 'peak_mb')} {(f'{r.first_piece_s:.1f}' if r.first_piece_s else '-'):>11} "
            f"{cell('preprocess', 'peak_mb', width=10)} {cell('resume', 'seconds', '{:.0f}', 9)} "
            f"{cell('resume', 'peak_mb', width=9)} {once:>5} "
            f"{cell('read', 'seconds', '{:.1f}', 7)} {cell('read', 'peak_mb')} "
            f"{(str(r.checkpoint_state_bytes) if r.checkpoint_state_bytes else '-'):>7} {cell('index', 'peak_mb')} "
            f"{(f'{r.requests_per_clip:.3f}' if r.requests_per_clip is not None else '-'):>8}"
        )
    return "\n".join(lines)


def as_json(results: list[ScaleResult], hardware: str) -> dict:
    return {"hardware": hardware, "stand_in": STAND_IN, "results": [asdict(r) for r in results]}


if __name__ == "__main__":
    _main(sys.argv[1:])
