"""Every GPU check of gram-ray in one run (`make gpu-check`), for the first GPU machine that comes along.

Parts, each a command a user can rerun alone (the JSON records it), each with its status, seconds and output:
  tests   pytest -m gpu: the exact gather under NCCL (2 processes), bf16 autocast's volume, the compiled loss,
          the training loop on the GPU;
  volume  bench volume --compile on the shapes of issue 11 (k=3 1024x8192, k=3 4096x32768, k=5 1024x8192),
          each against the paper's own construction and the compiled cosine floor;
  train   bench train on configs/msrvtt-hf.yaml's model (282 M parameters) with random weights: (a) plain loop,
          (b) run_training from the Parquet cache, (c) TorchTrainer + Ray Data;
  data    bench data on the same model's input: the pipeline's stages per CPU core, JPEG decoded by nvjpeg, and
          the cores one GPU needs at train's measured rate;
  fsdp    bench fsdp on the same model: DDP against FSDP2 in bf16 over NCCL (one rank per GPU, up to 2): memory
          per rank, step time, and FSDP's distance from DDP after the same steps;
  demo    the demo for one epoch on the GPU (decord decoding, one GPU worker, bf16).

Writes <out>/gpu-check.json (everything), <out>/gpu-check.txt (the short table) and <out>/gpu-check.log (every
part's output). Without CUDA the GPU-only parts are skipped with a message and the tests report their skips (a
dry run); --smoke runs every part on CPU with small sizes instead, to prove the script itself works.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GRAM_RAY = [sys.executable, "-m", "gram_ray"]

# (name, k, B1, B2): the shapes whose reference figures issue 11 gives for one H200.
VOLUME_SHAPES = [("k3-1024x8192", 3, 1024, 8192), ("k3-4096x32768", 3, 4096, 32768), ("k5-1024x8192", 5, 1024, 8192)]
SMOKE_VOLUME_SHAPES = [("k3-64x256", 3, 64, 256), ("k5-64x256", 5, 64, 256)]

# The acceptance targets of issue 11.
TARGETS = {
    "volume_speedup_vs_paper": 12.0,  # at least
    "volume_ratio_to_compiled_floor": 1.2,  # at most
    "volume_memory_share_of_paper": 0.2,  # at most
    "ray_share_of_plain": 0.9,  # at least
    "search_one_query_ms": 10.0,  # at most, 1M clips on one GPU
    "search_batch_ms": 100.0,  # at most, 1,000 queries over 1M clips on one GPU
}


class Check:
    def __init__(self, out: Path, deadline: float, log) -> None:
        self.out, self.deadline, self.log_file = out, deadline, log
        self.parts: dict[str, dict] = {}

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def skip(self, name: str, reason: str) -> None:
        self.say(f"[{name}] skipped: {reason}")
        self.parts[name] = {"status": "skipped", "reason": reason}

    def run(self, name: str, cmd: list[str], timeout: float, json_path: Path | None = None) -> dict:
        """Run one part; its output goes to the log as it comes; returns the part's record."""
        left = self.deadline - time.monotonic()
        if left < 20:
            self.skip(name, f"the check's time budget is spent ({left:.0f} s left)")
            return self.parts[name]
        shown = " ".join(str(c) for c in cmd).replace(sys.executable, "python")
        self.say(f"[{name}] $ {shown}")
        start = time.monotonic()
        record: dict = {"command": shown}
        try:
            proc = subprocess.Popen(
                [str(c) for c in cmd], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            for line in proc.stdout:
                self.log_file.write(f"[{name}] {line}")
            proc.wait(timeout=max(1.0, min(timeout, left) - (time.monotonic() - start)))
            record["status"] = "passed" if proc.returncode == 0 else "failed"
            record["returncode"] = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            record["status"] = "failed"
            record["reason"] = f"timed out after {min(timeout, left):.0f} s"
        record["seconds"] = round(time.monotonic() - start, 1)
        if json_path is not None and json_path.is_file():
            record["result"] = json.loads(json_path.read_text())
        self.log_file.flush()
        self.say(f"[{name}] {record['status']} in {record['seconds']} s")
        self.parts[name] = record
        return record


def _pytest_summary(xml_path: Path) -> dict:
    """Counts and each test's outcome (with the skip or failure message) from pytest's JUnit XML."""
    if not xml_path.is_file():
        return {}
    tests = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = ("failed" if tag != "skipped" else "skipped"), (node.get("message") or "")[:500]
        tests.append({"name": case.get("name"), "outcome": outcome, "message": message, "seconds": case.get("time")})
    counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "skipped")}
    return counts | {"tests": tests}


def _cuda() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not importable"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    return True, torch.cuda.get_device_name(0)


def run_checks(out: Path, data: Path | None, smoke: bool, budget_s: float, parts: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    has_cuda, device_name = _cuda()
    gpu = has_cuda and not smoke
    device = "cuda" if gpu else "cpu"
    deadline = time.monotonic() + budget_s
    work = Path(tempfile.mkdtemp(prefix="gram-ray-gpu-check-"))
    with open(out / "gpu-check.log", "w") as log:
        check = Check(out, deadline, log)
        check.say(f"gram-ray gpu-check on {device_name if has_cuda else platform.processor() or platform.machine()}")
        if not has_cuda:
            check.say(
                f"no GPU: {device_name}. "
                + (
                    "--smoke: every part runs on CPU with small sizes."
                    if smoke
                    else "Dry run: the GPU-only parts (volume, train, demo) are skipped and the GPU tests report their "
                    "skips. On a machine with an NVIDIA GPU this runs them all."
                )
            )

        if "tests" in parts:
            xml = work / "pytest-gpu.xml"
            pytest = f"-m pytest -m gpu tests/test_gpu.py -rs -q -p no:cacheprovider --junitxml={xml}".split()
            record = check.run("tests", [sys.executable, *pytest], timeout=360)
            record["result"] = _pytest_summary(xml)
            if record["status"] == "passed" and not has_cuda:
                record["status"] = "skipped"
                record["reason"] = "no CUDA device: every gpu test skipped itself (see result.tests)"

        def gpu_part(name: str, what: str) -> bool:
            """Whether to run a GPU part; without CUDA (and without --smoke) it is skipped, saying so."""
            if name not in parts:
                return False
            if not has_cuda and not smoke:
                check.skip(name, f"no CUDA device ({what} needs a GPU; --smoke runs it on CPU at small sizes)")
                return False
            return True

        if gpu_part("volume", "bench volume --device cuda"):
            for name, k, b1, b2 in SMOKE_VOLUME_SHAPES if smoke else VOLUME_SHAPES:
                path = work / f"volume-{name}.json"
                bench = (
                    f"bench volume --device {device} --compile --k {k} --b1 {b1} --b2 {b2} --reps {3 if smoke else 10}"
                )
                check.run(f"volume {name}", [*GRAM_RAY, *bench.split(), "--json", path], timeout=200, json_path=path)

        if gpu_part("train", "bench train of the MSR-VTT-sized model"):
            path = work / "train.json"
            sizes = (
                "--config configs/demo.yaml --steps 2 --warmup 1 --set train.batch_size=8"
                if smoke
                else "--config configs/msrvtt-hf.yaml --steps 15 --warmup 3"
            )
            bench = f"bench train --device {device} {sizes}"
            check.run("train", [*GRAM_RAY, *bench.split(), "--json", path], timeout=300, json_path=path)

        if gpu_part("data", "bench data with nvjpeg decoding"):
            path, train_json = work / "data.json", work / "train.json"
            sizes = (
                "--config configs/demo.yaml --batches 2 --reps 1"
                if smoke
                else "--config configs/msrvtt-hf.yaml --batches 8 --reps 3"
            )
            bench = f"bench data --device {device} {sizes}".split()
            if train_json.is_file():  # the GPU's measured rate of the same model (bench train above)
                bench += ["--train-json", train_json]
            check.run("data", [*GRAM_RAY, *bench, "--json", path], timeout=180, json_path=path)

        if gpu_part("search", "bench search over a 1M-clip index on the GPU"):
            path = work / "search.json"
            sizes = "--clips 20000 --queries 100 --reps 2" if smoke else "--clips 1000000 --queries 1000 --reps 5"
            bench = f"bench search --device {device} {sizes}"
            check.run("search", [*GRAM_RAY, *bench.split(), "--json", path], timeout=300, json_path=path)

        if gpu_part("fsdp", "bench fsdp over NCCL"):
            path = work / "fsdp.json"
            gpus = _gpu_count() if gpu else 2
            sizes = (
                "--steps 2 --warmup 1 --set train.batch_size=8"
                if smoke
                else "--config configs/msrvtt-hf.yaml --steps 5 --warmup 2 --set train.batch_size=8 "
                "--set train.grad_accum=2"
            )
            bench = f"bench fsdp --device {device} --workers {max(1, min(2, gpus))} {sizes}"
            check.run("fsdp", [*GRAM_RAY, *bench.split(), "--json", path], timeout=300, json_path=path)

        if gpu_part("demo", "a one-epoch demo on the GPU"):
            demo_out = work / "demo"
            overrides = (
                "train.epochs=1 train.warmup_steps=null scaling.num_workers=1 data.video.decoder=decord "
                f"wandb.enabled=false scaling.use_gpu={str(gpu).lower()}"
            )
            cmd = [*GRAM_RAY, "demo", "--out", demo_out, *(a for o in overrides.split() for a in ("--set", o))]
            if data is not None:
                cmd += ["--data", data]
            record = check.run("demo", cmd, timeout=240)
            summary = demo_out / "text-video-audio" / "summary.json"
            if summary.is_file():
                record["result"] = json.loads(summary.read_text())

    report = {
        "device": device_name if has_cuda else None,
        "ran_on": device,
        "smoke": smoke,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "ray": _version("ray"),
        "seconds": round(budget_s - (deadline - time.monotonic()), 1),
        "targets": TARGETS,
        "parts": check.parts,
    }
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str))
    table = summary_table(report)
    (out / "gpu-check.txt").write_text(table + "\n")
    print("\n" + table)
    return report


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def _meets(value: float | None, target: float, at_least: bool) -> str:
    if value is None:
        return "n/a"
    return "meets" if (value >= target if at_least else value <= target) else "MISSES"


def summary_table(report: dict) -> str:
    """The short text table: each part's status, then the figures against issue 11's targets."""
    lines = [
        f"gram-ray gpu-check: {report['device'] or 'no GPU'} (ran on {report['ran_on']}"
        f"{', smoke sizes' if report['smoke'] else ''}), torch {report['torch']}, ray {report['ray']}, "
        f"{report['seconds']} s",
        "",
        f"{'part':<22} {'status':<8} {'s':>6}  note",
    ]
    for name, part in report["parts"].items():
        note = part.get("reason", "")
        result = part.get("result") or {}
        if name == "tests" and result:
            note = f"{result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped"
            skips = {t["message"] for t in result["tests"] if t["outcome"] == "skipped"}
            note += "".join(f"; skipped: {m}" for m in sorted(skips))
        lines.append(f"{name:<22} {part['status']:<8} {part.get('seconds', 0):>6}  {note}")

    volume = [(n, p["result"]) for n, p in report["parts"].items() if n.startswith("volume ") and "result" in p]
    if volume:
        lines += [
            "",
            "volume loss, forward + backward (ms; peak MiB)",
            f"{'shape':<16} {'paper':>16} {'gram_volume':>16} {'compiled':>16} {'cosine floor':>16}  "
            f"{'x paper':>8} {'/ floor':>8} {'mem share':>9}",
        ]

        def cell(by: dict, variant: str) -> str:
            v = by.get(variant)
            if v is None:
                return f"{'-':>16}"
            mem = f"; {v['peak_bytes'] / 2**20:.0f}" if v["peak_bytes"] else ""
            return f"{v['seconds'] * 1e3:>9.2f}{mem:>7}"

        for name, r in volume:
            by = {v["variant"]: v for v in r["results"]}

            compiled = by.get("gram_volume+compile")
            speedup = r.get("compiled_speedup_vs_paper")
            floor = r.get("compiled_ratio_to_compiled_floor")
            # The compiled variant's peak is measured on CUDA only (bench_volume): no figure, no verdict.
            has_peaks = compiled and compiled["peak_bytes"] and by["paper"]["peak_bytes"]
            memory = compiled["peak_bytes"] / by["paper"]["peak_bytes"] if has_peaks else None
            lines.append(
                f"{name.removeprefix('volume '):<16} {cell(by, 'paper')} {cell(by, 'gram_volume')} "
                f"{cell(by, 'gram_volume+compile')} {cell(by, 'cosine+compile')}  "
                f"{speedup or 0:>7.1f}x {floor or 0:>7.2f}x "
                f"{f'{memory:.3f}' if memory is not None else 'n/a':>9}"
            )
            t = TARGETS
            lines.append(
                f"{'':<16} targets: >= {t['volume_speedup_vs_paper']:.0f}x paper "
                f"{_meets(speedup, t['volume_speedup_vs_paper'], True)}; "
                f"<= {t['volume_ratio_to_compiled_floor']}x floor "
                f"{_meets(floor, t['volume_ratio_to_compiled_floor'], False)}; <= {t['volume_memory_share_of_paper']} "
                f"of paper's memory {_meets(memory, t['volume_memory_share_of_paper'], False)}"
            )

    train = report["parts"].get("train", {}).get("result")
    if train:
        from gram_ray.bench.train import train_table

        ray_share = train.get("ratios", {}).get("ray/plain")
        lines += [
            "",
            train_table(train),
            f"target: (c) >= {TARGETS['ray_share_of_plain']:.0%} of (a): "
            f"{_meets(ray_share, TARGETS['ray_share_of_plain'], True)}",
        ]

    data = report["parts"].get("data", {}).get("result")
    if data:
        from gram_ray.bench.data import data_table

        lines += ["", data_table(data)]

    search = report["parts"].get("search", {}).get("result")
    if search:
        from gram_ray.bench.search import SearchBenchResult, search_table

        results = [SearchBenchResult(**r) for r in search["results"]]
        one, batch = max(r.one_query_ms for r in results), max(r.batch_ms for r in results)
        lines += [
            "",
            search_table(results, search["hardware"]),
            f"targets: 1 query <= {TARGETS['search_one_query_ms']} ms "
            f"{_meets(one, TARGETS['search_one_query_ms'], False)}; {results[0].batch_queries} queries <= "
            f"{TARGETS['search_batch_ms']} ms {_meets(batch, TARGETS['search_batch_ms'], False)}",
        ]

    fsdp = report["parts"].get("fsdp", {}).get("result")
    if fsdp:
        from gram_ray.bench.fsdp import fsdp_table

        lines += ["", "DDP against FSDP (bench fsdp)", fsdp_table(fsdp)]

    demo = report["parts"].get("demo", {}).get("result")
    if demo:
        lines += ["", f"demo, one epoch: {json.dumps(demo['main_metric'])}, {demo['wall_seconds']} s"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-check-out"))
    parser.add_argument(
        "--data", type=Path, help="demo data written by `gram-ray synth` (default: .gpu/demo-data when there)"
    )
    parser.add_argument("--smoke", action="store_true", help="run every part on CPU with small sizes")
    parser.add_argument("--budget", type=float, default=500, help="seconds for the whole check (parts after it skip)")
    parser.add_argument(
        "--parts", default="tests,volume,train,data,search,fsdp,demo", help="which parts, comma-separated"
    )
    args = parser.parse_args()
    data = args.data
    if data is None and (REPO / ".gpu" / "demo-data").is_dir():
        data = REPO / ".gpu" / "demo-data"
    report = run_checks(args.out.resolve(), data, args.smoke, args.budget, args.parts.split(","))
    failed = [n for n, p in report["parts"].items() if p["status"] == "failed"]
    print(
        f"\n{args.out}/gpu-check.json, gpu-check.txt, gpu-check.log"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
