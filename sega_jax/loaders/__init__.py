"""Weights from files onto loaded models: diffusers pipeline folders (`folders`), LoRA adapters (`lora`)
and learned concepts / textual inversion (`concepts`). May import `builtin`, `core`, `models`,
`schedulers` and `runtime`; never `pipelines` or above.
"""
