"""The engine through the CUDA execution provider against the engine on this machine's CPU, in one run.

    pip install -e ".[gpu]"                      # onnxruntime-gpu in place of onnxruntime
    python bench/bench_gpu.py                    # models/default: what a GPU serves (fp16) vs what the CPU serves
    python bench/bench_gpu.py --provider cpu     # a dry run without a GPU: the GPU's precision on the CPU

First, where the nodes run: an ONNX Runtime profile of the served graph (a 64-token prompt and decode
steps through its plain interface, the way the engine drives a GPU) counted by execution provider.
On a GPU every node of the fp16 variant should be on CUDAExecutionProvider but for the few integer
nodes that read the positions; a GroupQueryAttention on the CPU means the cache crosses the bus at
every layer of every step. Then, for each side: a decode step after 256, 512 and 896 positions (16
successive cached steps from there), a prefill of 256 and 512 tokens, the first note of the 4-bar
chorale cold and prepared (`Generator.prefill` into a PrefillCache first, as the server's `prepare`
does), and its whole 8-bar continuation (the Generator, everything `segue continue` does) with its
milliseconds per token. Wall time (a GPU's time is not this process's CPU time), medians of
--repeats rounds, the two sides alternated within each round.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_prefix import first_note_ms  # noqa: E402
from bench_server import prompt_payload  # noqa: E402

from engine import host_lengths  # noqa: E402
from engine.generate import ContinuationRequest, Generator, VariationDone  # noqa: E402
from engine.machine import cpu_name  # noqa: E402
from engine.manifest import MODEL_FILE, read_model_folder  # noqa: E402
from engine.prefill_cache import PrefillCache  # noqa: E402
from engine.session import CPU, CUDA, session_options  # noqa: E402
from plugin_bridge.protocol import parse_clip  # noqa: E402

CONTEXTS = (256, 512, 896)
PREFILLS = (256, 512)
DECODE_STEPS = 16


def load(folder: Path, provider: str, variant: str | None = None) -> Generator:
    """The generator a server started with SEGUE_PROVIDER=provider would serve (its precision chosen so,
    unless `variant` is given)."""
    previous = os.environ.get("SEGUE_PROVIDER")
    os.environ["SEGUE_PROVIDER"] = provider
    try:
        return Generator.load(folder, variant=variant)
    finally:
        if previous is None:
            os.environ.pop("SEGUE_PROVIDER")
        else:
            os.environ["SEGUE_PROVIDER"] = previous


def placement(folder: Path, variant: str, providers: list[str]) -> dict[str, collections.Counter]:
    """Per execution provider, the nodes of `variant`'s graph that ran there, by operator."""
    manifest, files = read_model_folder(folder)
    graph = files[MODEL_FILE] if variant == "fp32" else files[manifest.variants[variant].file]
    if CUDA in providers:  # as the engine gives it to a GPU
        graph = host_lengths.rewrite(graph)[0]
    options = session_options(1)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "placement")
    session = ort.InferenceSession(graph, options, providers=providers)
    past_type = next(i.type for i in session.get_inputs() if i.name == manifest.onnx.past_inputs[0])
    dtype = np.float16 if past_type == "tensor(float16)" else np.float32
    shape = manifest.model
    pasts = [np.zeros((1, shape.n_head, 0, shape.head_dim), dtype) for _ in manifest.onnx.past_inputs]
    ids = np.random.default_rng(0).integers(0, shape.vocab_size, (1, 64))
    position = 0
    declared = {i.name for i in session.get_inputs()}
    for step in (ids, ids[:, :1], ids[:, 1:2], ids[:, 2:5]):  # a prompt, two decode steps, a three-token step
        positions = np.arange(position, position + step.shape[1])[None]
        feeds = {"input_ids": step, "position_ids": positions, **dict(zip(manifest.onnx.past_inputs, pasts, strict=True)),
                 **{k: v for k, v in host_lengths.feeds(positions).items() if k in declared}}
        outputs = session.run(None, feeds)
        pasts, position = outputs[1:], position + step.shape[1]
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    where: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args:
            where[args["provider"]][event["name"].removesuffix("_kernel_time")] = args.get("op_name", "?")
    return {provider: collections.Counter(nodes.values()) for provider, nodes in where.items()}


def wall_ms(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def decode_ms(generator: Generator, context: int) -> float:
    decoder = generator.decoder
    ids = np.random.default_rng(context).integers(0, decoder.vocab_size, (1, context + DECODE_STEPS))
    _, cache = decoder.step(ids[:, :context], decoder.empty_cache())
    started = time.perf_counter()
    for i in range(DECODE_STEPS):
        _, cache = decoder.step(ids[:, context + i:context + i + 1], cache)
    return (time.perf_counter() - started) * 1000 / DECODE_STEPS


def prefill_ms(generator: Generator, tokens: int) -> float:
    decoder = generator.decoder
    ids = np.random.default_rng(tokens).integers(0, decoder.vocab_size, (1, tokens))
    return wall_ms(lambda: decoder.step(ids, decoder.empty_cache()))


def prepared_first_note_ms(generator: Generator, clip, request: ContinuationRequest) -> float:
    prefills = PrefillCache()
    generator.prefill(clip, prefills)
    return first_note_ms(generator, clip, prefills, request)


def continuation(generator: Generator, clip, request: ContinuationRequest) -> tuple[float, int]:
    started = time.perf_counter()
    done = [e for e in generator.stream(clip, request) if isinstance(e, VariationDone)]
    return (time.perf_counter() - started) * 1000, sum(len(d.tokens) for d in done)


class DeviceBufferSteps:
    """Decode steps at ONNX Runtime's level with the cache in one preallocated device buffer per layer,
    bound as both past and present, as the engine does (engine/session.py's _DeviceStore), but with
    every input bound once at a fixed device address and new values written in place, and the logits
    left on the device until read: what the engine's Python around a step costs. `cuda_graph`: the
    steps replayed as one captured CUDA graph (ONNX Runtime's enable_cuda_graph); the prompt then runs
    on the plain session into the same buffers. What a next version of the engine's GPU path could do,
    measured before it is built."""

    def __init__(self, generator: Generator, cuda_graph: bool = False):
        decoder = self.decoder = generator.decoder
        self.prompt_session = decoder.session
        if cuda_graph:
            manifest, files = read_model_folder(decoder.folder)
            graph = files[MODEL_FILE] if decoder.variant == "fp32" else files[manifest.variants[decoder.variant].file]
            graph = host_lengths.rewrite(graph)[0]
            self.step_session = ort.InferenceSession(graph, session_options(1),
                                                     providers=[(CUDA, {"enable_cuda_graph": "1"}), CPU])
        else:
            self.step_session = decoder.session
        self.cuda_graph = cuda_graph
        shape = (1, decoder.n_head, decoder.max_context, decoder.head_dim)
        self.buffers = [ort.OrtValue.ortvalue_from_shape_and_type(shape, decoder.cache_dtype, "cuda", 0)
                        for _ in decoder.past_names]
        self.ids = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1), np.int64), "cuda", 0)
        self.positions = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1), np.int64), "cuda", 0)
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type((1, 1, decoder.vocab_size), np.float32, "cuda", 0)
        self.step_binding = self._binding(self.step_session)
        declared = {i.name for i in self.step_session.get_inputs()}
        self.last = ort.OrtValue.ortvalue_from_numpy(np.ones(1, np.int64), "cuda", 0) if "last_positions" in declared else None
        # seqlens_k on the device, written in place each step; total_sequence_length is read on the host
        # (and baked into a captured graph), so it stays at the buffer's capacity: the kernels take each
        # row's length from seqlens_k (onnxruntime-genai's way of capturing GroupQueryAttention).
        self.lengths = {}
        if host_lengths.SEQLENS in declared:
            self.lengths[host_lengths.SEQLENS] = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.int32), "cuda", 0)
            self.step_binding.bind_ortvalue_input(host_lengths.SEQLENS, self.lengths[host_lengths.SEQLENS])
            self.total = ort.OrtValue.ortvalue_from_numpy(np.array(decoder.max_context, np.int32))
            self.step_binding.bind_ortvalue_input(host_lengths.TOTAL, self.total)
        self.step_binding.bind_ortvalue_input("input_ids", self.ids)
        self.step_binding.bind_ortvalue_input("position_ids", self.positions)
        if self.last is not None:
            self.step_binding.bind_ortvalue_input("last_positions", self.last)
        self.step_binding.bind_ortvalue_output("logits", self.logits)

    def _binding(self, session: ort.InferenceSession):
        binding = session.io_binding()
        for past, present, buffer in zip(self.decoder.past_names, self.decoder.present_names, self.buffers, strict=True):
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        return binding

    def prompt(self, ids: np.ndarray) -> None:
        binding = self._binding(self.prompt_session)
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("position_ids", np.arange(ids.shape[1], dtype=np.int64)[None])
        declared = {i.name for i in self.prompt_session.get_inputs()}
        if "last_positions" in declared:
            binding.bind_cpu_input("last_positions", np.ones(1, np.int64))
        for name, value in host_lengths.feeds(np.arange(ids.shape[1])[None]).items():
            if name in declared:
                binding.bind_cpu_input(name, value)
        binding.bind_output("logits", "cpu")
        self.prompt_session.run_with_iobinding(binding)

    def step(self, token: int, position: int) -> np.ndarray:
        self.ids.update_inplace(np.array([[token]], np.int64))
        self.positions.update_inplace(np.array([[position]], np.int64))
        for name, value in host_lengths.feeds(np.array([[position]])).items():
            if name in self.lengths:
                self.lengths[name].update_inplace(value)
        self.step_session.run_with_iobinding(self.step_binding)
        return self.logits.numpy()  # to the host, as the engine's logits are

    def decode_ms(self, context: int) -> float:
        ids = np.random.default_rng(context).integers(0, self.decoder.vocab_size, (1, context + DECODE_STEPS))
        self.prompt(ids[:, :context])
        started = time.perf_counter()
        for i in range(DECODE_STEPS):
            self.step(int(ids[0, context + i]), context + i)
        return (time.perf_counter() - started) * 1000 / DECODE_STEPS

    def agrees_with_the_engine(self) -> float:
        """The largest difference between these steps' logits and the engine's on the same tokens."""
        decoder = self.decoder
        ids = np.random.default_rng(5).integers(0, decoder.vocab_size, (1, 80))
        _, cache = decoder.step(ids[:, :64], decoder.empty_cache())
        self.prompt(ids[:, :64])
        worst = 0.0
        for i in range(64, 80):
            expected, cache = decoder.step(ids[:, i:i + 1], cache)
            worst = max(worst, float(np.abs(self.step(int(ids[0, i]), i)[0, -1] - expected[0]).max()))
        return worst


def device_buffer_table(generator: Generator, repeats: int) -> None:
    """The engine's GPU step against DeviceBufferSteps, plain and as a CUDA graph, alternated in rounds."""
    sides: dict[str, object] = {"engine (device buffers, engine/session.py)": generator}
    for name, graph in (("the same, inputs bound once on the device", False), ("the same, replayed as a CUDA graph", True)):
        try:
            steps = DeviceBufferSteps(generator, cuda_graph=graph)
            print(f"{name}: largest logit difference from the engine's steps {steps.agrees_with_the_engine():.3g}")
            sides[name] = steps
        except Exception as exc:  # onnxruntime's own error types: report and go on with the others
            print(f"{name}: not run ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})")
    times: dict[str, dict[int, list[float]]] = {name: collections.defaultdict(list) for name in sides}
    for round_ in range(repeats):
        for name, side in (list(sides.items()) if round_ % 2 == 0 else list(reversed(sides.items()))):
            for context in CONTEXTS:
                ms = decode_ms(side, context) if isinstance(side, Generator) else side.decode_ms(context)  # type: ignore[attr-defined]
                times[name][context].append(ms)
    print()
    print(f"Decode step on the GPU, ms (median of {repeats}, {DECODE_STEPS} steps each)")
    print()
    print("| cache | " + " | ".join(f"ms/token {c}" for c in CONTEXTS) + " |")
    print("|---|" + "---|" * len(CONTEXTS))
    base = {c: statistics.median(times["engine (device buffers, engine/session.py)"][c]) for c in CONTEXTS}
    for name in sides:
        print(f"| {name} | " + " | ".join(
            f"{statistics.median(times[name][c]):.3g} ({base[c] / statistics.median(times[name][c]):.2f}x)" for c in CONTEXTS) + " |")


def gpu_name() -> str:
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
        return found.stdout.strip() or "no GPU reported by nvidia-smi"
    except (OSError, subprocess.SubprocessError):
        return "nvidia-smi not found"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--provider", choices=["cuda", "cpu"], default="cuda",
                        help="the accelerated side's SEGUE_PROVIDER (cpu: a dry run of this script without a GPU)")
    parser.add_argument("--repeats", type=int, default=7, help="rounds, the two sides alternated in each (median)")
    parser.add_argument("--bars", type=int, default=8, help="bars of the continuation")
    args = parser.parse_args()

    print(f"onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())}); CPU: {cpu_name()}; "
          f"GPU: {gpu_name()}")
    # The dry run gives its first side the GPU's precision (what choose_for_gpu picks) on the CPU, so that
    # the graph a GPU would run goes through every measurement here too.
    from engine.variant_choice import choose_for_gpu

    gpu_variant = choose_for_gpu(read_model_folder(args.model)[0])[0]
    sides = {args.provider: load(args.model, args.provider, gpu_variant if args.provider == "cpu" else None),
             "cpu only": load(args.model, "cpu")}
    accelerated = sides[args.provider]
    for name, generator in sides.items():
        decoder = generator.decoder
        print(f"{name}: {decoder.variant} on {decoder.device} ({', '.join(decoder.session.get_providers())}): "
              f"{decoder.serve_reason}")
    wanted = [CUDA, CPU] if args.provider == "cuda" else [CPU]
    print()
    print(f"Where the nodes of {accelerated.decoder.variant}'s graph ran ({', '.join(wanted)} asked for):")
    for provider, ops in placement(args.model, accelerated.decoder.variant, wanted).items():
        print(f"  {provider}: {sum(ops.values())} nodes ({', '.join(f'{op} {n}' for op, n in sorted(ops.items()))})")
    print()

    clip = parse_clip(prompt_payload(ROOT / "docs" / "examples" / "chorale.mid", 4), "chorale")
    request = ContinuationRequest(bars=args.bars, variations=1, seed=0)
    tasks = {**{f"ms/token {c}": (lambda g, c=c: decode_ms(g, c)) for c in CONTEXTS},
             **{f"prefill {t} (ms)": (lambda g, t=t: prefill_ms(g, t)) for t in PREFILLS},
             "first note cold (ms)": lambda g: first_note_ms(g, clip, None, request),
             "first note prepared (ms)": lambda g: prepared_first_note_ms(g, clip, request)}
    results: dict[str, dict[str, list[float]]] = {name: collections.defaultdict(list) for name in sides}
    for generator in sides.values():  # first use of every shape out of the timings
        for task in tasks.values():
            task(generator)
    for round_ in range(args.repeats):
        order = list(sides.items()) if round_ % 2 == 0 else list(reversed(sides.items()))
        for name, generator in order:
            for label, task in tasks.items():
                results[name][label].append(task(generator))
            whole, tokens = continuation(generator, clip, request)
            results[name][f"{args.bars}-bar continuation (ms)"].append(whole)
            results[name]["per token end to end (ms)"].append(whole / max(tokens, 1))
    labels = list(results[args.provider])
    print(f"{args.model}, the 4-bar chorale, {args.bars} bars, seed 0; wall time, medians of {args.repeats}")
    print()
    print("| side | variant | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    medians = {name: {label: statistics.median(values) for label, values in results[name].items()} for name in sides}
    for name, generator in sides.items():
        print(f"| {name} | {generator.decoder.variant} | " + " | ".join(f"{medians[name][label]:.3g}" for label in labels) + " |")
    print(f"| cpu / {args.provider} | | " + " | ".join(
        f"{medians['cpu only'][label] / medians[args.provider][label]:.2f}x" for label in labels) + " |")
    if accelerated.decoder.device == "cuda":
        print()
        device_buffer_table(accelerated, args.repeats)


if __name__ == "__main__":
    main()
