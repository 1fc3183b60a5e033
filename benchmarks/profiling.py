"""Where a run's device time goes: its kernels, most time first, and their share by kind.

    rows, summary = profile_kernels(lambda: model(x), device)

On CUDA the profiler's device kernels; on CPU (smoke checks) the operators' own time.
`summary` holds the total kernel time, the wall time of the profiled call (a gap
between them is the device idling), and the time per kind: GEMMs (cuBLAS/nvjet,
CUTLASS, scaled-mm), attention, optimizer kernels, copies and the rest (fused
elementwise and reduction kernels).
"""

import time

import torch

KINDS = (
    ("attention", ("flash", "fmha", "sdpa", "attention", "flex")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "scaled_mm", "aten::mm", "aten::addmm", "aten::bmm")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy", ("memcpy", "memset", "copy")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    if low.startswith("triton_"):  # inductor's fused kernels name the ops they absorbed
        return "fused elementwise"
    for kind, marks in KINDS:
        if any(m in low for m in marks):
            return kind
    return "other"


def profile_kernels(fn, device: torch.device, top: int = 15) -> tuple[list[dict], dict]:
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0

    def self_us(e) -> float:
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    events = sorted((e for e in prof.key_averages() if self_us(e) > 0), key=lambda e: -self_us(e))
    total = sum(self_us(e) for e in events)
    kinds: dict[str, float] = {}
    for e in events:
        kinds[kind_of(e.key)] = kinds.get(kind_of(e.key), 0.0) + self_us(e) / 1e3
    rows = [{"kernel": e.key[:120], "kind": kind_of(e.key), "ms": self_us(e) / 1e3, "calls": e.count,
             "share": self_us(e) / total} for e in events[:top]]
    summary = {"kernel_ms": total / 1e3, "wall_ms": wall * 1e3,
               "by_kind_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1]))}
    return rows, summary


def print_profile(rows: list[dict], summary: dict) -> None:
    print(f"  kernels {summary['kernel_ms']:.1f} ms in {summary['wall_ms']:.1f} ms wall; "
          + ", ".join(f"{k} {v:.1f}" for k, v in summary["by_kind_ms"].items()))
    for r in rows:
        print(f"  {r['ms']:8.2f} ms {r['share']:6.1%} {r['calls']:5d}  {r['kernel'][:100]}")


def one_pass_row_reductions(max_numel: int) -> None:
    """Inductor heuristic, for measuring: inner (row) reductions up to `max_numel` wide
    compile as persistent kernels (one program holds a row, one pass over it) instead of
    looped ones past inductor's own 1,024. Process-wide, for later compilations."""
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    original = InductorChoices.should_use_persistent_reduction

    def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
        if original(features, cooperative_reduction):
            return True
        if not config.triton.persistent_reductions or cooperative_reduction:
            return False
        if features.get_reduction_hint() != ReductionHint.INNER:
            return False
        return V.graph.sizevars.statically_known_leq(features.reduction_numel, max_numel)

    InductorChoices.should_use_persistent_reduction = staticmethod(should_use_persistent_reduction)


def timed(fn, reps: int) -> float:
    """Milliseconds a call, CUDA events around `reps` back-to-back calls after two warm-up
    calls (the queue stays full, so host launch time is not counted)."""
    fn(), fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps
