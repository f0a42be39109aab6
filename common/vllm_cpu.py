"""The environment vLLM's CPU backend reads when an engine starts, shared by serving's and the trainer's.

Values already in the environment win, so an operator can still pin a dedicated serving host.
"""

from __future__ import annotations

import os


def prepare_cpu_engine(kv_cache_gib: int) -> None:
    """Call before building a vLLM engine on a machine without a GPU.

    - VLLM_CPU_KVCACHE_SPACE: the backend reserves its KV cache from this (GiB); its default fraction of
      the machine's memory fails beside the other processes here.
    - VLLM_CPU_OMP_THREADS_BIND=nobind: by default ("auto") vLLM pins its worker to the first cores, where
      it computes without pause, and any other process pinned there gets (next to) no CPU. Every process
      that imports torch is pinned for a moment: MKL counts the cores by binding itself to each in turn.
      Next to a pinned serving engine, the trainer stuck there for 15 minutes before its first log line.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
