import os

from common.vllm_cpu import prepare_cpu_engine


def test_the_engine_is_unpinned_with_the_kv_cache_asked_for(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    prepare_cpu_engine(kv_cache_gib=3)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"


def test_an_operator_can_still_pin_a_dedicated_host(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-7")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "16")
    prepare_cpu_engine(kv_cache_gib=1)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0-7" and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "16"
