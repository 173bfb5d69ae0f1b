"""Opt-in tests that start a real llama.cpp engine (llama-cpp-python's server):
scripts/llamacpp_test.sh runs them."""
