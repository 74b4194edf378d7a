"""Where the vocabulary head's time goes at the real 151,936-token vocabulary: `losses.chunked_head`
forward and backward on 880 tokens of width 64 (8 recomputed chunks of 110 rows, as the step
chunks them), without a student (GRPO's head) and with one (OISD's logit channel), CPU seconds
after a warm-up and torch profiler's table of operators by self CPU time, one thread.

    OMP_NUM_THREADS=1 python benchmarks/head_profile.py > benchmarks/results/head_profile.txt
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from oisd_lab import losses
from oisd_lab import step as step_lib

V, D, N = 151_936, 64, 880


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    unembed, norm = torch.nn.Linear(D, V, bias=False), torch.nn.RMSNorm(D)
    final, student = torch.randn(N, D, requires_grad=True), torch.randn(N, D, requires_grad=True)
    tokens, weights = torch.randint(0, V, (N,)), torch.randn(N)
    chunk = step_lib.VOCAB_CHUNK_ELEMENTS // V

    def run(students: int) -> None:
        lens = ((student, lambda h: unembed(norm(h))),) * students
        out = losses.chunked_head(norm(final), tokens, unembed, V, chunk_size=chunk, students=lens)
        total = (out.logps * weights).sum() + sum((d * weights).sum() for d in out.lens_jsd)
        total.backward()

    print(f"V={V}, D={D}, N={N}, chunks of {chunk} rows, above the recomputation threshold: "
          f"{N * V > losses.LENS_CHECKPOINT_MIN_ELEMENTS}")
    for students in (0, 1):
        run(students)
        t0 = time.process_time()
        run(students)
        print(f"{students} student(s): {time.process_time() - t0:.2f} CPU s", flush=True)
    for students in (0, 1):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(students)
        print(f"\n== {students} student(s)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=16, max_name_column_width=48))


if __name__ == "__main__":
    main()
