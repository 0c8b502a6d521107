"""The torch/diffusers oracles the tests and `sega-jax bench` compare against (`reference`): tiny and
real-architecture random pipelines saved as diffusers folders. Needs the test extra; the runtime never
imports it (an import-linter contract).
"""
